"""Checkpoints that are not what they claim (issue 16, item 5): code of their own, weights missing or
extra, broken weight files. Each is refused with a ModelRefError naming the problem, wherever it is
loaded (the captioner, the trainer's parts, the hot swap), and checkpoint code never runs."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from captionfleet.core import checkpoint_load
from captionfleet.core.captioner import Captioner
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.model_store import ModelRefError, check_checkpoint_dir
from captionfleet.trainer.model import configure_model, load_training_parts
from captionfleet.trainer.settings import TrainerSettings
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.watcher import ModelWatcher
from tests.hostile_checkpoints import (
    copy_checkpoint,
    sharded,
    tensors,
    with_a_broken_header,
    with_an_extra_tensor,
    with_half_the_weights,
    with_remote_code,
)


def loaders(ckpt: Path) -> dict[str, Callable[[], object]]:
    """Every way a checkpoint folder is loaded."""
    return {
        "captioner": lambda: Captioner.from_dir(ckpt, device="cpu", precision="fp32"),
        "trainer": lambda: load_training_parts(ckpt),
    }


# -- code of its own ------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_a_checkpoint_with_code_of_its_own_is_refused_and_its_code_never_runs(
    tiny_checkpoint: Path, tmp_path: Path, config_name: str
) -> None:
    marker = tmp_path / "marker"
    ckpt = with_remote_code(copy_checkpoint(tiny_checkpoint, tmp_path), marker, config_name)
    for name, load in loaders(ckpt).items():
        with pytest.raises(ModelRefError, match=rf"auto_map in {config_name}") as info:
            load()
        assert "captionfleet never runs checkpoint code" in str(info.value), name
    assert not marker.exists()


def test_auto_map_in_a_nested_config_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["decoder"]["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelRefError, match=r"auto_map in config\.json"):
        check_checkpoint_dir(ckpt)


def test_the_loaders_never_trust_checkpoint_code_even_past_the_check(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: transformers itself is told not to run checkpoint code, so even a "y" waiting
    # at its "Do you wish to run the custom code?" prompt runs nothing.
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    marker = tmp_path / "marker"
    ckpt = with_remote_code(copy_checkpoint(tiny_checkpoint, tmp_path), marker)
    for load in (checkpoint_load.load_tokenizer, checkpoint_load.load_image_processor):
        with contextlib.suppress(ModelRefError):  # refusing is as good as loading without the code
            load(ckpt)
        assert not marker.exists(), load.__name__


def test_a_config_that_is_not_json_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    (ckpt / "tokenizer_config.json").write_bytes(b"\xff{not json")
    with pytest.raises(ModelRefError, match=r"tokenizer_config\.json.* is not readable JSON"):
        check_checkpoint_dir(ckpt)


def test_a_config_nested_past_the_parser_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    (ckpt / "extra_config.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ModelRefError, match=r"extra_config\.json.* is not readable JSON"):
        check_checkpoint_dir(ckpt)


def test_a_fifo_named_like_a_config_is_refused_unread(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    os.mkfifo(ckpt / "extra_config.json")  # reading it would wait for a writer forever
    with pytest.raises(ModelRefError, match=r"extra_config\.json.* is not a regular file"):
        check_checkpoint_dir(ckpt)


def test_the_store_failing_during_init_from_is_worth_a_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Exit 2 says nothing will change by running again; a store that failed says the opposite (exit 1).
    from botocore.exceptions import EndpointConnectionError

    from captionfleet.trainer.__main__ import main

    def unreachable(ref: str, **kwargs: object) -> Path:
        try:
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        except EndpointConnectionError as error:
            raise ModelRefError(f"could not list {ref}: {error}") from error

    monkeypatch.setattr("captionfleet.core.model_store.resolve_model_ref", unreachable)
    flags = ["--init-from", "s3://models/x", "--max-steps", "1", "--no-progress", "--device", "cpu"]
    assert main([*flags, "--out-dir", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run")]) == 1
    assert "could not list s3://models/x" in capsys.readouterr().err


# -- weights that are not there --------------------------------------------------------------------


def test_a_checkpoint_holding_half_its_weights_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    weights = tensors(tiny_checkpoint)
    ckpt = with_half_the_weights(copy_checkpoint(tiny_checkpoint, tmp_path))
    for load in loaders(ckpt).values():
        with pytest.raises(ModelRefError, match=r"lacks \d+ of the model's weights") as info:
            load()
        assert sorted(weights)[-1] in str(info.value) or "..." in str(info.value)


def test_a_checkpoint_with_no_weights_of_the_model_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    save_file({"unrelated": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    with pytest.raises(ModelRefError, match=r"lacks \d+ of the model's weights"):
        Captioner.from_dir(ckpt, device="cpu", precision="fp32")


def test_a_checkpoint_with_an_extra_tensor_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = with_an_extra_tensor(copy_checkpoint(tiny_checkpoint, tmp_path))
    for load in loaders(ckpt).values():
        with pytest.raises(ModelRefError, match=r"holds 1 weights the model does not have .*: decoder\.extra\.weight"):
            load()


def test_a_complete_checkpoint_still_loads(tiny_checkpoint: Path) -> None:
    # GPT-2's lm_head is tied to its embeddings and absent from the file: not "missing".
    assert "decoder.lm_head.weight" not in tensors(tiny_checkpoint)
    Captioner.from_dir(tiny_checkpoint, device="cpu", precision="fp32")
    load_training_parts(tiny_checkpoint)


def test_a_checkpoint_saved_by_transformers_4_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # Such GPT-2 checkpoints (the reference model among them) carry the attention's mask buffers, which
    # transformers 5 no longer has: not weights, so not "unexpected".
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    legacy = dict(tensors(ckpt))
    for block in ("attn", "crossattention"):
        legacy[f"decoder.transformer.h.0.{block}.masked_bias"] = torch.tensor(-1e4)
        legacy[f"decoder.transformer.h.0.{block}.bias"] = torch.tril(torch.ones(4, 4)).view(1, 1, 4, 4)
    save_file(legacy, str(ckpt / "model.safetensors"))
    for load in loaders(ckpt).values():
        load()


# -- broken files -----------------------------------------------------------------------------------


def test_a_safetensors_file_with_a_broken_header_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = with_a_broken_header(copy_checkpoint(tiny_checkpoint, tmp_path))
    for load in loaders(ckpt).values():
        with pytest.raises(ModelRefError, match=r"model\.safetensors' is not a readable safetensors file"):
            load()


def test_a_safetensors_file_cut_short_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelRefError, match=r"model\.safetensors' is not a readable safetensors file"):
        Captioner.from_dir(ckpt, device="cpu", precision="fp32")


def test_an_index_naming_a_pickled_shard_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = sharded(copy_checkpoint(tiny_checkpoint, tmp_path), "pytorch_model-00002.bin")
    for load in loaders(ckpt).values():
        with pytest.raises(ModelRefError, match=r"names the pickled shard 'pytorch_model-00002\.bin'"):
            load()


@pytest.mark.parametrize(
    ("second", "problem"),
    [("absent-00002.safetensors", "lacks the shard"), ("../elsewhere.safetensors", "not a .safetensors file")],
)
def test_an_index_naming_a_shard_that_is_not_there_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, second: str, problem: str
) -> None:
    ckpt = sharded(copy_checkpoint(tiny_checkpoint, tmp_path), second)
    with pytest.raises(ModelRefError, match=problem):
        check_checkpoint_dir(ckpt)


def test_a_complete_sharded_checkpoint_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    Captioner.from_dir(sharded(copy_checkpoint(tiny_checkpoint, tmp_path), "model-00002.safetensors"), device="cpu")


def test_the_trainers_init_from_refuses_a_broken_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = with_a_broken_header(copy_checkpoint(tiny_checkpoint, tmp_path))
    settings = TrainerSettings(init_from=str(ckpt), cache_dir=tmp_path / "cache")
    with pytest.raises(ModelRefError, match="not a readable safetensors file"):
        configure_model(settings, ["a caption"])


def test_train_refuses_a_broken_init_from_in_one_line_with_exit_2(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from captionfleet.trainer.__main__ import main

    ckpt = with_a_broken_header(copy_checkpoint(tiny_checkpoint, tmp_path))
    flags = ["--init-from", str(ckpt), "--max-steps", "1", "--no-progress", "--device", "cpu"]
    assert main([*flags, "--out-dir", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a readable safetensors file" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()


def test_the_hot_swap_keeps_serving_when_a_version_is_broken(tiny_checkpoint: Path, tmp_path: Path) -> None:
    serving = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="fp32")
    broken = with_an_extra_tensor(copy_checkpoint(tiny_checkpoint, tmp_path))
    hot, metrics = HotSwapCaptioner(serving), WorkerMetrics()

    def load(version: str) -> Captioner:
        return Captioner.from_dir(broken, device="cpu", precision="fp32")

    watcher = ModelWatcher(hot, lambda: "v2", load, interval_s=1, metrics=metrics)
    assert watcher.check() == "failed"
    assert hot.version == serving.version
    assert metrics.sample("captionfleet_model_load_failures_total") == 1


# -- the other families (core/families): the same rules --------------------------------------------

# A Florence-2 checkpoint as microsoft/Florence-2-base ships it: transformers' own model type, with code
# of its own named in auto_map.
FLORENCE_AUTO_MAP = {
    "AutoConfig": "configuration_florence2.Florence2Config",
    "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
}


def florence_with_remote_code(tiny_family: Callable[[str], Path], tmp_path: Path, marker: Path) -> Path:
    ckpt = copy_checkpoint(tiny_family("florence2"), tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = FLORENCE_AUTO_MAP
    (ckpt / "config.json").write_text(json.dumps(config))
    for module in ("configuration_florence2", "modeling_florence2"):
        (ckpt / f"{module}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return ckpt


def test_a_family_checkpoint_with_code_of_its_own_is_refused_naming_the_native_conversion(
    tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    ckpt = florence_with_remote_code(tiny_family, tmp_path, marker)
    with pytest.raises(ModelRefError) as info:
        load_checkpoint(ckpt, device="cpu", precision="fp32")
    message = str(info.value)
    assert "auto_map in config.json, model type 'florence2'" in message
    assert "florence-community/Florence-2-base" in message and "captionfleet never runs checkpoint code" in message
    assert not marker.exists()


def test_the_family_loaders_never_trust_checkpoint_code_even_past_the_check(
    tiny_family: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    marker = tmp_path / "marker"
    ckpt = florence_with_remote_code(tiny_family, tmp_path, marker)
    for load in (
        checkpoint_load.load_config,
        lambda path: checkpoint_load.load_processor(path, "florence2"),
        lambda path: checkpoint_load.load_image_text_model(path, torch.float32),
    ):
        with contextlib.suppress(ModelRefError):
            load(ckpt)
        assert not marker.exists()


@pytest.mark.parametrize("family", ["blip", "qwen2_vl"])
def test_a_family_checkpoint_holding_half_its_weights_is_refused(
    family: str, tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    ckpt = with_half_the_weights(copy_checkpoint(tiny_family(family), tmp_path))
    with pytest.raises(ModelRefError, match=r"lacks \d+ of the model's weights"):
        load_checkpoint(ckpt, device="cpu", precision="fp32")


def test_a_family_checkpoint_with_an_extra_tensor_or_only_pickles_is_refused(
    tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    extra = copy_checkpoint(tiny_family("git"), tmp_path, "extra")
    save_file({**tensors(extra), "git.extra.weight": torch.zeros(3)}, str(extra / "model.safetensors"))
    with pytest.raises(ModelRefError, match=r"holds 1 weights the model does not have"):
        load_checkpoint(extra, device="cpu", precision="fp32")
    pickled = copy_checkpoint(tiny_family("git"), tmp_path, "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelRefError, match="only safetensors are loaded"):
        load_checkpoint(pickled, device="cpu", precision="fp32")


def test_the_vision_encoder_decoder_captioner_names_the_loader_for_another_family(
    tiny_family: Callable[[str], Path],
) -> None:
    with pytest.raises(ModelRefError, match="'blip' checkpoint, not vision-encoder-decoder: load it with"):
        Captioner.from_dir(tiny_family("blip"), device="cpu")
