import dataclasses

import pytest
import yaml

from gt_ray.config import (CollabConfig, CorpusConfig, DPConfig, ExperimentConfig, FinetuneConfig, HealConfig, LoraSpec, ModelSpec,
                           TranslatorSection, load_yaml)
from gt_ray.pipeline import apply_best_settings
from gt_ray.yaml_io import from_dict
from tests.conftest import ROOT


# ``*_best.yaml``: translator settings (what `gt-ray translator tune` writes), read through a
# config's ``translator.best_config``, not experiment configs.
EXPERIMENT_CONFIGS = [p for p in sorted(ROOT.glob("configs/**/*.yaml")) if not p.name.endswith("_best.yaml")]


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads(path):
    cfg = load_yaml(path)
    assert isinstance(cfg, ExperimentConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each config starts with a comment naming the command that uses it"
    if cfg.translator.best_config:  # a committed one (relative to the repository root) applies to the config
        best = yaml.safe_load((ROOT / cfg.translator.best_config).read_text())
        model, train = apply_best_settings(cfg, best)
        assert best and (model, train) != (cfg.translator.model, cfg.translator.train)


def test_every_committed_best_config_is_read_by_a_config():
    read = {load_yaml(p).translator.best_config for p in EXPERIMENT_CONFIGS}
    for best in ROOT.glob("configs/**/*_best.yaml"):
        assert str(best.relative_to(ROOT)) in read


def test_unknown_key_names_its_path():
    with pytest.raises(ValueError, match=r"finetune: unknown key\(s\) \['stepz'\]"):
        from_dict(ExperimentConfig, {"pair": {"tiny": {"path": "a"}, "llm": {"path": "b"}}, "finetune": {"stepz": 3}})


def test_wrong_type_is_refused():
    with pytest.raises(ValueError, match=r"finetune.steps: expected an integer, got 'ten'"):
        from_dict(ExperimentConfig, {"pair": {"tiny": {"path": "a"}, "llm": {"path": "b"}}, "finetune": {"steps": "ten"}})


def test_missing_pair_is_refused():
    with pytest.raises(ValueError, match="pair"):
        from_dict(ExperimentConfig, {})


@pytest.mark.parametrize("make, message", [
    (lambda: ModelSpec(), "exactly one of 'path', 'registry', 'arch' and 'derive_from'"),
    (lambda: ModelSpec(path="x", arch={"model_type": "llama"}), "exactly one of 'path', 'registry', 'arch' and 'derive_from'"),
    (lambda: ModelSpec(derive_from=ModelSpec(path="x")), "derive_from needs keep_layers"),
    (lambda: ModelSpec(derive_from=ModelSpec(path="x"), keep_layers=[0, 2, 2]), "keep_layers must be increasing"),
    (lambda: ModelSpec(derive_from=ModelSpec(derive_from=ModelSpec(path="x"), keep_layers=[0]), keep_layers=[0]),
     "not another derived one"),
    (lambda: ModelSpec(path="x", keep_layers=[0]), "keep_layers is used only with derive_from"),
    (lambda: HealConfig(steps=10, warmup_steps=10), r"warmup_steps must be in \[0, steps\)"),
    (lambda: ModelSpec(arch={"hidden_size": 3}), "needs a 'model_type'"),
    (lambda: LoraSpec(rank=0), "rank must be > 0"),
    (lambda: LoraSpec(target_modules=["q_proj", "q_proj"]), "duplicates"),
    (lambda: LoraSpec(llm_target_modules=[]), "llm_target_modules must name at least one module"),
    (lambda: LoraSpec(llm_target_modules=["o_proj", "o_proj"]), "llm_target_modules has duplicates"),
    (lambda: LoraSpec().for_side("teacher"), "side must be 'tiny' or 'llm'"),
    (lambda: FinetuneConfig(steps=10, snapshot_steps=[5, 11]), r"snapshot_steps must be within 1..steps=10"),
    (lambda: FinetuneConfig(snapshot_steps=[80, 60]), "strictly increasing"),
    (lambda: DPConfig(enabled=True), "exactly one of target_epsilon and noise_multiplier"),
    (lambda: DPConfig(delta=2.0), r"delta must be in \(0, 1\)"),
    (lambda: CollabConfig(sizes=[4, 2]), "sizes must be strictly increasing"),
    (lambda: CollabConfig(sizes=[0, 2]), "sizes must be strictly increasing integers >= 1"),
    (lambda: CollabConfig(n_examples=0), "n_examples must be > 0"),
    (lambda: CollabConfig(trim_fraction=0.5), r"trim_fraction must be in \[0, 0.5\)"),
    (lambda: TranslatorSection(seeds=[0, 0]), "translator.seeds must be a non-empty list of distinct seeds"),
    (lambda: TranslatorSection(seeds=[]), "translator.seeds must be a non-empty list of distinct seeds"),
    (lambda: CorpusConfig(n_tiny_only=-1), "n_tiny_only must be >= 0"),
])
def test_bad_values_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pair: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(bad)


def test_yaml_numbers_in_e_notation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pair: {tiny: {path: a}, llm: {path: b}}\nfinetune: {lr: 3e-3}\n")
    assert load_yaml(p).finetune.lr == pytest.approx(3e-3)


def test_derived_model_spec_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pair: {tiny: {derive_from: {path: big}, keep_layers: [0, 5], heal: {steps: 7, warmup_steps: 2}}, llm: {path: big}}\n")
    tiny = load_yaml(p).pair.tiny
    assert tiny.derive_from == ModelSpec(path="big")
    assert tiny.keep_layers == [0, 5] and tiny.heal.steps == 7


def test_translator_section_is_typed_and_leaves_the_layouts_to_the_corpus():
    pair = {"tiny": {"path": "a"}, "llm": {"path": "b"}}
    cfg = from_dict(ExperimentConfig, {"pair": pair, "translator": {"model": {"d_model": 32, "dropout": 0}}})
    model = cfg.translator.model
    assert model.d_model == 32 and model.dropout == 0.0 and isinstance(model.dropout, float)
    assert model.num_layers == 2 and model.d_tiny is None  # defaults from TranslatorConfig, layouts unset
    assert cfg.translator.train.max_epochs == 200 and cfg.translator.train.patience == 20
    with pytest.raises(ValueError, match=r"translator.model: unknown key\(s\) \['widht'\]"):
        from_dict(ExperimentConfig, {"pair": pair, "translator": {"model": {"widht": 32}}})
    with pytest.raises(ValueError, match=r"translator: model must not set the layouts \['d_llm'\]"):
        from_dict(ExperimentConfig, {"pair": pair, "translator": {"model": {"d_llm": 8}}})
    with pytest.raises(ValueError, match="translator.model: TranslatorConfig.d_model=30 is not divisible"):
        from_dict(ExperimentConfig, {"pair": pair, "translator": {"model": {"d_model": 30}}})


def test_per_side_lora_modules_from_yaml(tmp_path):
    """``pair.lora.llm_target_modules`` gives the LLM its own modules; the TinyLM keeps
    ``target_modules``, and without the key both sides share them."""
    data = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    data["pair"]["lora"]["llm_target_modules"] = ["q_proj", "v_proj", "o_proj", "down_proj"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    lora = load_yaml(tmp_path / "c.yaml").pair.lora
    assert lora.for_side("tiny").target_modules == ["q_proj", "v_proj"]
    assert lora.for_side("llm").target_modules == ["q_proj", "v_proj", "o_proj", "down_proj"]
    assert lora.for_side("llm").llm_target_modules is None
    shared = load_yaml(ROOT / "configs/tiny.yaml").pair.lora
    assert shared.for_side("llm").target_modules == shared.for_side("tiny").target_modules == ["q_proj", "v_proj"]
    assert "llm_target_modules" not in shared.to_card()


def test_a_config_starts_from_a_base(tmp_path):
    """``base:`` loads another YAML first; mappings merge key by key, lists replace; the
    committed world candidates are configs/tiny.yaml with other LoRA modules and work_dir."""
    (tmp_path / "base.yaml").write_text("pair: {tiny: {path: a}, llm: {path: b}, lora: {rank: 4, target_modules: [q_proj, v_proj]}}\n"
                                        "finetune: {lr: 3e-3, steps: 100}\nwork_dir: w0\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/c.yaml").write_text("base: ../base.yaml\npair: {lora: {target_modules: [v_proj]}}\nfinetune: {lr: 1e-3}\n")
    cfg = load_yaml(tmp_path / "sub/c.yaml")
    assert cfg.pair.lora.target_modules == ["v_proj"] and cfg.pair.lora.rank == 4 and cfg.pair.tiny.path == "a"
    assert cfg.finetune.lr == pytest.approx(1e-3) and cfg.finetune.steps == 100 and cfg.work_dir == "w0"
    tiny = load_yaml(ROOT / "configs/tiny.yaml")
    for name, module in (("tiny_side_q", "q_proj"), ("tiny_side_v", "v_proj")):
        world = load_yaml(ROOT / f"configs/world/{name}.yaml")
        assert world.pair.lora.target_modules == [module] and len(world.pair.lora.llm_target_modules) == 7
        assert world.pair.tiny == tiny.pair.tiny and world.corpus == tiny.corpus and world.work_dir == f"runs/world_side_{module[0]}"


def test_a_bad_base_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="makes a cycle"):
        load_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ValueError, match="config file not found.*the base of"):
        load_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [x]\n")
    with pytest.raises(ValueError, match="base: expected a path"):
        load_yaml(tmp_path / "d.yaml")


def test_the_default_config_is_the_lengths_world_at_2000_subsets_and_50_epochs():
    """Every command's default config is the lengths world: the same pair, tasks, fine-tune
    and corpus as ``configs/world/lengths_2k.yaml`` (so the two share runs/world_lengths_2k's
    pair and corpus), with the translator trained 50 epochs without early stopping, after the
    sweep; ``lengths_2k_demo.yaml`` is the same with the sweep's choice fixed."""
    from jobs.common import DEFAULT_CONFIG

    default = load_yaml(ROOT / DEFAULT_CONFIG)
    world = load_yaml(ROOT / "configs/world/lengths_2k.yaml")
    for key in ("pair", "tasks", "finetune", "corpus", "eval", "work_dir", "sweep"):
        assert getattr(default, key) == getattr(world, key), key
    assert default.tasks.names == ["shift", "mirror", "affine", "spell"] and default.corpus.n_tiny_only == 2858
    assert default.translator.train.max_epochs == default.translator.train.patience == 50
    assert default.translator.best_config is None  # the demo runs the Ray Tune sweep
    assert world.translator.train.max_epochs == 40 and default.translator.model == world.translator.model
    fixed = load_yaml(ROOT / "configs/world/lengths_2k_demo.yaml")
    assert dataclasses.replace(fixed.translator, best_config=None) == default.translator


def test_a_best_config_overrides_only_its_keys_and_refuses_what_does_not_fit():
    cfg = load_yaml(ROOT / "configs/ci.yaml")
    model, train = apply_best_settings(cfg, {"model": {"d_model": 48}, "train": {"lr": 0.002}})
    assert (model.d_model, train.lr) == (48, 0.002)
    assert model.num_layers == cfg.translator.model.num_layers and train.batch_size == cfg.translator.train.batch_size
    with pytest.raises(ValueError, match=r"from my.yaml: unknown sections \['sweep'\]"):
        apply_best_settings(cfg, {"sweep": {}}, "my.yaml")
    with pytest.raises(ValueError, match="from my.yaml"):
        apply_best_settings(cfg, {"train": {"learning_rate": 1.0}}, "my.yaml")


def test_serve_config_yaml_serves_what_the_default_demo_writes():
    from jobs.common import DEFAULT_CONFIG

    work = load_yaml(ROOT / DEFAULT_CONFIG).work_dir
    (app,) = yaml.safe_load((ROOT / "serve/config.yaml").read_text())["applications"]
    for key in ("checkpoint", "card", "tokens", "state_dir"):
        assert app["args"][key].startswith(work.rstrip("/") + "/"), key
