"""Shared by the kernel tests: the device they run on, a comparison that names the mismatching elements, and the
chi-square p-value of the sampling tests."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_report(actual, expected, atol, rtol, what="out"):
    actual, expected = actual.float().cpu(), expected.float().cpu()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol) | actual.isnan()
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        details = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())}/{bad.numel()} mismatches; first (index, got, want): {details}")


def chi_square_p_value(observed, expected) -> float:
    """``scipy.stats.chisquare(observed, expected).pvalue`` without scipy (absent on the lent GPU machine, where the
    sampling laws matter most): the upper tail of the chi-square law with len - 1 degrees of freedom at Pearson's
    statistic, which is the regularized upper incomplete gamma function Q(dof / 2, statistic / 2)."""
    observed = torch.as_tensor(observed, dtype=torch.float64).flatten().cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).flatten().cpu()
    assert observed.numel() == expected.numel() >= 2, (observed.numel(), expected.numel())
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))
