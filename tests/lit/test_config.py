import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mgqa.lit.run import build, resolve_model_config
from mgqa.model import ConfigError
from tests.conftest import compose


def test_default_config_composes_to_the_documented_model():
    cfg = compose("run_dir=/tmp/unused")
    model = resolve_model_config(cfg)
    assert (model.dim, model.depth, model.heads, model.kv_heads, model.max_seq_len) == (256, 4, 8, 2, 256)
    assert model.num_tokens == 257  # derived from the byte tokenizer
    assert cfg.data.seq_len == 256 and cfg.trainer.precision == "auto"


def test_user_overrides_reach_the_model_and_trainer():
    cfg = compose("model.kv_heads=4", "model.heads=8", "model.dim=128", "model.depth=3", "trainer.max_steps=7", "trainer.devices=1")
    model = resolve_model_config(cfg)
    assert (model.kv_heads, model.heads, model.dim, model.depth) == (4, 8, 128, 3)
    assert cfg.trainer.max_steps == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.kv_heads=3"], "model.kv_heads (3) must divide model.heads (8)"),
        (["model.dim=250"], "model.dim (250) must be divisible by model.heads (8)"),
        (["model.num_tokens=100"], "model.num_tokens (100) is smaller than the 'byte' tokenizer's vocabulary (257)"),
        (["data.seq_len=512"], "data.seq_len (512) exceeds model.max_seq_len (256)"),
        (["model.pos_emb=alibi"], "model.pos_emb='alibi' is unknown"),
        (["trainer=fsdp", "trainer.accelerator=cpu"], "trainer=fsdp needs CUDA GPUs (trainer.accelerator=cpu"),
    ],
)
def test_invalid_configs_fail_before_any_data_is_read(overrides, message, tmp_path):
    cfg = compose(f"run_dir={tmp_path}", *overrides)
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_data_files_are_named_before_training(tmp_path):
    cfg = compose(f"run_dir={tmp_path}", f"data.files={tmp_path}/none/*.txt")
    with pytest.raises(FileNotFoundError, match="none/\\*.txt"):
        build(cfg)


@pytest.mark.parametrize(
    "override, fragment",
    [("model=gpt9", "model/gpt9"), ("model=schema", "model/schema"), ("model.colour=red", "colour"),
     ("model.kv_heads=two", "two")],
)
def test_unknown_presets_keys_and_types_fail_at_composition(override, fragment):
    with pytest.raises(ConfigCompositionException) as err:
        compose(override)
    assert fragment in str(err.value) + str(err.value.__cause__)


def test_every_config_group_option_composes():
    for override in ["model=seed", "logger=tensorboard", "experiment=mqa", "debug=fast"]:
        cfg = compose("run_dir=/tmp/unused", override)
        OmegaConf.to_container(cfg.model, resolve=True)
        resolve_model_config(cfg)
    assert compose("experiment=mqa").model.kv_heads == 1
