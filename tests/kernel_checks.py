"""Shared by the kernel tests: the device they run on and a comparison that names the mismatching elements."""
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
