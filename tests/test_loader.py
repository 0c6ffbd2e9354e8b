"""Checkpoint loading: single and sharded safetensors, transformers 4.x and 5.x config.json, legacy weight-norm names,
generation_config.json defaults, and a clear CheckpointError (naming the file or key) for every broken checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastgen
from fastgen import CheckpointError, SamplingParams

GREEDY = SamplingParams(duration=0.3, do_sample=False, seed=0)
PROMPTS = ["lofi hip hop beat", None]


def load(path, **kwargs) -> fastgen.MusicGen:
    return fastgen.MusicGen.from_pretrained(path, device="cpu", dtype=torch.float32, max_slots=2, **kwargs)


def greedy(model: fastgen.MusicGen) -> list[fastgen.GenerationOutput]:
    return model.generate(PROMPTS, GREEDY)


def assert_same_outputs(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.codes, w.codes)
        np.testing.assert_allclose(g.audio, w.audio, rtol=0, atol=1e-6)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def reference(tiny_mono_dir):
    return greedy(load(tiny_mono_dir))


# ---------------------------------------------------------------------------------------------------- formats
def test_single_file_loads(tiny_mono_dir, reference):
    assert (tiny_mono_dir / "model.safetensors").is_file()
    assert not (tiny_mono_dir / "model.safetensors.index.json").exists()
    assert [o.codes.shape for o in reference] == [(4, 15), (4, 15)]
    assert all(np.isfinite(o.audio).all() and o.audio.std() > 0 for o in reference)


def test_sharded_checkpoint_matches_single_file(tiny_mono_dir, tmp_path, reference):
    from transformers import MusicgenForConditionalGeneration
    sharded = copy_checkpoint(tiny_mono_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    MusicgenForConditionalGeneration.from_pretrained(tiny_mono_dir).save_pretrained(sharded, max_shard_size="50KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert_same_outputs(greedy(load(sharded)), reference)


# Keys every PretrainedConfig.to_dict() wrote in transformers 4.31, with their defaults (5.x dropped most of them).
COMMON_4X = {
    "return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False,
    "torch_dtype": "float32", "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
    "tie_word_embeddings": True, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "num_return_sequences": 1, "chunk_size_feed_forward": 0, "output_scores": False,
    "return_dict_in_generate": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "architectures": None, "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "tokenizer_class": None,
    "prefix": None, "bos_token_id": None, "pad_token_id": None, "eos_token_id": None, "sep_token_id": None,
    "decoder_start_token_id": None, "task_specific_params": None, "problem_type": None,
    "transformers_version": "4.31.0",
}
SUB_4X = {  # what the facebook exports carry per sub-config
    "text_encoder": {"_name_or_path": "t5-base", "architectures": ["T5ForConditionalGeneration"], "n_positions": 512,
                     "output_past": True, "is_encoder_decoder": True,
                     "task_specific_params": {"summarization": {"prefix": "summarize: "}}},
    "audio_encoder": {"_name_or_path": "facebook/encodec_32khz", "architectures": ["EncodecModel"]},
    "decoder": {"_name_or_path": "", "tie_word_embeddings": False},
}


def to_4x_config(config: dict) -> dict:
    """A transformers 5.x MusicgenConfig dict as transformers 4.31 (the facebook exports) serialised it."""
    old = {k: v for k, v in config.items() if k != "dtype"}
    old.update(_name_or_path="facebook/musicgen-small", torch_dtype=config.get("dtype", "float32"),
               transformers_version="4.31.0")
    for name, extra in SUB_4X.items():
        sub = {k: v for k, v in config[name].items() if k != "dtype"}
        old[name] = {**COMMON_4X, **extra, **sub}
    return old


def to_legacy_weight_norm(weights: dict) -> int:
    """EnCodec's weight norm as the original exports store it: weight_g / weight_v. Returns how many were renamed."""
    renamed = 0
    for key in list(weights):
        for new, old in (("parametrizations.weight.original0", "weight_g"),
                         ("parametrizations.weight.original1", "weight_v")):
            if key.endswith(new):
                weights[key[:-len(new)] + old] = weights.pop(key)
                renamed += 1
    return renamed


@pytest.mark.parametrize("config_4x,legacy_names", [(True, False), (False, True), (True, True)],
                         ids=["4x-config", "weight_g-weight_v", "facebook-export"])
def test_older_serialisations_load(tiny_mono_dir, tmp_path, reference, config_4x, legacy_names):
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert "dtype" in config and "torch_dtype" not in config  # the fixture is in the 5.x serialisation
    if config_4x:
        (folder / "config.json").write_text(json.dumps(to_4x_config(config), indent=2))
    if legacy_names:
        counts = []
        edit_weights(folder, lambda w: counts.append(to_legacy_weight_norm(w)))
        assert counts[0] > 0
        assert any(k.endswith(".weight_g") for k in load_file(folder / "model.safetensors"))
    assert_same_outputs(greedy(load(folder)), reference)


def test_generation_config_supplies_defaults(tiny_mono_dir, tmp_path):
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(max_length=21, guidance_scale=1.5, top_k=7, do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    model = load(folder)
    defaults = model.defaults
    assert (defaults.max_new_tokens, defaults.guidance_scale, defaults.top_k) == (20, 1.5, 7)

    def resolved(params=None):
        return model.engine.make_request("lofi", params).resolved

    r = resolved()
    # transformers: max_length counts the start token; the delay pattern costs codebooks - 1 further steps
    assert (r.new_frames, r.guidance_scale, r.top_k) == (21 - 4, 1.5, 7)
    out = model.generate(["lofi"], SamplingParams(seed=3))[0]
    assert out.codes.shape == (4, 17) and out.audio.shape == (1, 17 * 640)
    # SamplingParams fields override the checkpoint's defaults
    r = resolved(SamplingParams(duration=0.1, guidance_scale=2.0, top_k=3, temperature=0.5))
    assert (r.new_frames, r.guidance_scale, r.top_k, r.temperature) == (5, 2.0, 3, 0.5)
    assert resolved(SamplingParams(max_new_tokens=10)).new_frames == 7
    assert resolved(SamplingParams(do_sample=False)).temperature == 0.0


def test_without_generation_config_builtin_defaults(tiny_mono_dir, tmp_path):
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    (folder / "generation_config.json").unlink()
    request = load(folder).engine.make_request("lofi", None)
    r = request.resolved
    assert (r.new_frames, r.guidance_scale, request.params.top_k) == (10 * 50, 3.0, 250)
    assert r.top_k == 0  # 250 ≥ the tiny model's 64-token vocabulary: the filter keeps everything, so it is off


# ---------------------------------------------------------------------------------------------------- errors
def _drop(key):
    def edit(folder):
        edit_weights(folder, lambda w: w.pop(key))
    return edit


def _add(key):
    def edit(folder):
        edit_weights(folder, lambda w: w.__setitem__(key, torch.zeros(3)))
    return edit


def _reshape(key):
    def edit(folder):
        def change(w):
            w[key] = torch.zeros(*w[key].shape[:-1], w[key].shape[-1] + 1)
        edit_weights(folder, change)
    return edit


def _write(name, data: bytes):
    def edit(folder):
        (folder / name).write_bytes(data)
    return edit


def _delete(name):
    def edit(folder):
        (folder / name).unlink()
    return edit


def _retype(key, dtype):
    def edit(folder):
        edit_weights(folder, lambda w: w.__setitem__(key, torch.zeros(w[key].shape).to(dtype)))
    return edit


def _delete_all(*names):
    def edit(folder):
        for name in names:
            (folder / name).unlink()
    return edit


def _truncate(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _drop_section(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["decoder"]
    (folder / "config.json").write_text(json.dumps(config))


DEC = "decoder.model.decoder.layers.1.fc2.weight"
T5 = "text_encoder.encoder.block.1.layer.1.DenseReluDense.wo.weight"
CODEC = "audio_encoder.decoder.layers.0.conv.bias"
CODEBOOK = "audio_encoder.quantizer.layers.2.codebook.embed"

BROKEN = {
    "no-config": (_delete("config.json"), "config.json"),
    "config-not-json": (_write("config.json", b"{not json"), "config.json"),
    "config-binary": (_write("config.json", b"\xff\xfe\x00\x01"), "config.json"),
    "config-not-object": (_write("config.json", b"[1, 2]"), "config.json"),
    "config-no-decoder": (_drop_section, "decoder"),
    "generation-config-not-json": (_write("generation_config.json", b"{"), "generation_config.json"),
    "no-weights": (_delete("model.safetensors"), "model.safetensors"),
    "truncated": (_truncate, "model.safetensors"),
    "missing-decoder-key": (_drop(DEC), DEC),
    "missing-t5-key": (_drop(T5), T5),
    "missing-encodec-key": (_drop(CODEC), CODEC),
    "missing-codebook": (_drop(CODEBOOK), CODEBOOK),
    "unexpected-decoder-key": (_add("decoder.model.decoder.layers.0.extra.weight"), "layers.0.extra.weight"),
    "unexpected-t5-key": (_add("text_encoder.encoder.extra.weight"), "text_encoder.encoder.extra.weight"),
    "unexpected-encodec-key": (_add("audio_encoder.extra.bias"), "audio_encoder.extra.bias"),
    "unexpected-stray-key": (_add("lm_head.weight"), "lm_head.weight"),
    "shape-decoder": (_reshape("decoder.model.decoder.layers.0.fc1.weight"), "layers.0.fc1.weight"),
    "shape-t5": (_reshape(T5), T5),
    "shape-encodec": (_reshape("audio_encoder.encoder.layers.0.conv.parametrizations.weight.original1"),
                      "audio_encoder.encoder.layers.0.conv.parametrizations.weight.original1"),
    # weights that are concatenated or stacked with others when loaded (issue 9, item 9)
    "missing-embedding": (_drop("decoder.model.decoder.embed_tokens.2.weight"), "embed_tokens.2.weight"),
    "missing-k-proj": (_drop("decoder.model.decoder.layers.0.self_attn.k_proj.weight"), "self_attn.k_proj"),
    "missing-lm-head": (_drop("decoder.lm_heads.0.weight"), "decoder.lm_heads.0.weight"),
    "int8-weight": (_retype(DEC, torch.int8), f"{DEC} has dtype I8"),
    "bool-weight": (_retype(T5, torch.bool), f"{T5} has dtype BOOL"),
    "complex-weight": (_retype(CODEC, torch.complex64), f"{CODEC} has dtype C64"),
    "no-tokenizer": (_delete_all("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
                     "tokenizer"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_names_the_problem(tiny_mono_dir, tmp_path, case):
    corrupt, named = BROKEN[case]
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    corrupt(folder)
    with pytest.raises(CheckpointError) as info:
        load(folder)
    assert named in str(info.value)
    if case.startswith("shape"):
        assert "shape" in str(info.value)
    if case == "truncated":
        assert "truncated" in str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)  # as transformers users catch it


def _set(section, key, value):
    def edit(config):
        config[section][key] = value
    return edit


# (config.json edit, words of the message): each once ended in an untyped error, a hang or gigabytes of memory
BAD_CONFIGS = {
    "decoder-layers-1e9": (_set("decoder", "num_hidden_layers", 10**9), "num_layers"),
    "decoder-codebooks-1e9": (_set("decoder", "num_codebooks", 10**9), "num_codebooks"),
    "decoder-width-string": (_set("decoder", "hidden_size", "64"), "hidden_size"),
    "decoder-heads-zero": (_set("decoder", "num_attention_heads", 0), "num_heads"),
    "decoder-activation-number": (_set("decoder", "activation_function", 5), "activation"),
    "codec-ratio-zero": (_set("audio_encoder", "upsampling_ratios", [8, 0, 4, 4]), "upsampling_ratios"),
    "codec-ratios-string": (_set("audio_encoder", "upsampling_ratios", "8544"), "upsampling_ratios"),
    "codec-rate-string": (_set("audio_encoder", "sampling_rate", "fast"), "sampling_rate"),
    "codec-rate-null": (_set("audio_encoder", "sampling_rate", None), "sampling_rate"),
    "codec-residual-layers-1e9": (_set("audio_encoder", "num_residual_layers", 10**9), "num_residual_layers"),
    "codec-hidden-huge": (_set("audio_encoder", "hidden_size", 100_000), "audio_encoder"),
    "codec-lstm-negative": (_set("audio_encoder", "num_lstm_layers", -1), "audio_encoder"),
    "codec-kernel-zero": (_set("audio_encoder", "kernel_size", 0), "audio_encoder"),
    "codec-codebook-dim-string": (_set("audio_encoder", "codebook_dim", "x"), "codebook_dim"),
    "t5-width-string": (_set("text_encoder", "d_model", "wide"), "d_model"),
    "t5-layers-1e9": (_set("text_encoder", "num_layers", 10**9), "num_layers"),
    "t5-heads-zero": (_set("text_encoder", "num_heads", 0), "text_encoder"),
    "t5-vocab-negative": (_set("text_encoder", "vocab_size", -5), "text_encoder"),
    "t5-activation-unknown": (_set("text_encoder", "feed_forward_proj", "warp-drive"), "feed_forward_proj"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_corrupt_config_is_a_checkpoint_error_at_once(tiny_mono_dir, tmp_path, case):
    edit, words = BAD_CONFIGS[case]
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=words):
        load(folder)
    assert time.perf_counter() - start < 30


def test_shard_outside_the_folder_is_refused(tiny_mono_dir, tmp_path):
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    names = split_into_shards(folder)
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / names[0], outside)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in ("../outside.safetensors", str(outside)):
        index["weight_map"] = {k: (shard if v == names[0] else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="not a file name inside the checkpoint folder"):
            load(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-folder"):
        load(tmp_path / "no-such-folder")


def test_file_instead_of_folder(tiny_mono_dir):
    with pytest.raises(CheckpointError, match="config.json"):
        load(tiny_mono_dir / "model.safetensors")


def split_into_shards(folder: Path, parts: int = 3) -> list[str]:
    """Turn model.safetensors into transformers' sharded layout by hand."""
    weights = load_file(folder / "model.safetensors")
    keys = sorted(weights)
    names = [f"model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map = {}
    for i, name in enumerate(names):
        chunk = keys[i::parts]
        save_file({k: weights[k] for k in chunk}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


def test_hand_sharded_loads_and_missing_shard_is_named(tiny_mono_dir, tmp_path, reference):
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    names = split_into_shards(folder)
    assert_same_outputs(greedy(load(folder)), reference)
    (folder / names[1]).unlink()
    with pytest.raises(CheckpointError, match=names[1]):
        load(folder)


def test_index_listing_absent_tensor(tiny_mono_dir, tmp_path):
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    names = split_into_shards(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["decoder.model.decoder.ghost.weight"] = names[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="decoder.model.decoder.ghost.weight"):
        load(folder)


@pytest.fixture
def pickled_dir(tiny_mono_dir, tmp_path) -> Path:
    folder = copy_checkpoint(tiny_mono_dir, tmp_path / "ckpt")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_refused_by_default(pickled_dir):
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        load(pickled_dir)
    assert "pickle" in str(info.value) and "allow_pickle" in str(info.value)


def test_pickle_loads_weights_only_when_allowed(pickled_dir, reference, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert_same_outputs(greedy(load(pickled_dir, allow_pickle=True)), reference)
    assert calls == [True]


class NotATensor:  # a pickle that weights_only=True must refuse to rebuild
    pass


def test_pickle_with_arbitrary_objects_is_refused(pickled_dir):
    torch.save({"decoder.x": NotATensor()}, pickled_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load(pickled_dir, allow_pickle=True)


# ---------------------------------------------------------------------------------------------------- hub ids
def test_hub_id_offline_fails_fast_without_network(monkeypatch):
    """HF_HUB_OFFLINE set after import (huggingface_hub reads it only at import) must still keep the loader off the
    network."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the loader went to the network in offline mode")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="fastgen-tests/no-such-model") as info:
        load("fastgen-tests/no-such-model")
    assert time.perf_counter() - start < 5
    assert "AssertionError" not in str(info.value)  # the spy above was not reached
    assert "local folder" in str(info.value)


@pytest.fixture
def silent_server():
    """A TCP endpoint that accepts connections and never answers: a hub behind a black-holing network."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_hub_id_with_unresponsive_network_times_out(silent_server, tmp_path):
    """Without offline mode, a hub id on a network that never answers must end in a CheckpointError within the
    timeout (huggingface_hub's own first request has none and would wait forever)."""
    script = textwrap.dedent("""
        import fastgen
        try:
            fastgen.MusicGen.from_pretrained("facebook/musicgen-small", device="cpu")
        except fastgen.CheckpointError as exc:
            print("CheckpointError:", exc)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=silent_server, HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="1")
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a hub id hung on an unresponsive network")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CheckpointError:" in result.stdout and "facebook/musicgen-small" in result.stdout, result.stdout
    assert time.perf_counter() - start < 60


def test_relative_path_that_looks_like_hub_id(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not a local folder"):
        load("checkpoints/musicgen")



@pytest.mark.parametrize("entry", ["Engine", "AsyncEngine", "MusicGen"])
def test_loading_logs_no_pad_or_bos_token_warnings(tiny_mono_dir, entry):
    """transformers warns that MusicGen's pad/bos id lies outside the vocabulary when AutoTokenizer builds a
    MusicgenConfig; it is silenced where the model loads, so every entry point is quiet."""
    import logging
    messages: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
    handler = Record()
    logging.getLogger("transformers").addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process: the fixture's build was first
    try:
        if entry == "Engine":
            fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=1).close()
        elif entry == "AsyncEngine":
            fastgen.AsyncEngine.from_pretrained(tiny_mono_dir, max_slots=1).shutdown_sync()
        else:
            fastgen.MusicGen.from_pretrained(tiny_mono_dir, max_slots=1)
        # the filter ends with the load: the same warning afterwards does come through (the handler hears it)
        logging.getLogger("transformers.configuration_utils").warning_once(
            "CONTROL: pad_token_id must be `None` or an integer within the vocabulary")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [m for m in messages if "within the vocabulary" in m] == [
        "CONTROL: pad_token_id must be `None` or an integer within the vocabulary"]
