from pathlib import Path

import pytest

from dpq.errors import DpqError
from dpq.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def _shipped_profiles():
    """(recipe, profile) for every recipe in recipes/ and each of its profiles, None (the recipe as written) too."""
    import yaml

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        for profile in [None, *(yaml.safe_load(path.read_text()).get("profiles") or {})]:
            yield pytest.param(path.name, profile, id=f"{path.stem}-{profile or 'as-written'}")


@pytest.mark.parametrize("name, profile", list(_shipped_profiles()))
def test_every_shipped_recipe_and_profile_loads_and_checks(name, profile):
    r = load_recipe(REPO / "recipes" / name, profile)
    assert r.teacher.model and r.distill.student
    if profile == "fast":
        assert r.teacher.max_train_samples and r.teacher.epochs == 1


def test_the_sst2_recipe_has_the_profiles_the_readme_names():
    import yaml

    assert {"fast", "gpu", "full"} <= set(yaml.safe_load((REPO / "recipes" / "sst2.yaml").read_text())["profiles"])


def test_profile_overrides_and_yaml_exponent_strings(tmp_path):
    p = write(tmp_path, "teacher: {lr: 2e-5, epochs: 3}\nprofiles:\n  fast: {teacher: {epochs: 1}}\n")
    r = load_recipe(p, "fast")
    assert r.teacher.lr == pytest.approx(2e-5) and r.teacher.epochs == 1
    assert load_recipe(p).teacher.epochs == 3
    assert r.data.path == "nyu-mll/glue:sst2"


@pytest.mark.parametrize("text, message", [
    ("teacher: {epoch: 2}\n", "unknown setting 'epoch' (did you mean 'epochs'?)"),
    ("distil: {}\n", "unknown section 'distil' (did you mean 'distill'?)"),
    ("teacher: {epochs: two}\n", "teacher.epochs: expected an integer"),
    ("teacher: {batch_size: 0}\n", "teacher.batch_size: must be >= 1"),
    ("distill: {alpha: 1.5}\n", "distill.alpha: must be <= 1"),
    ("distill: {temperature: 0}\n", "distill.temperature: must be > 0"),
    ("teacher: {lr: fast}\n", "teacher.lr: expected a number"),
    ("baseline: {enabled: maybe}\n", "expected true or false"),
    ("teacher: [1, 2]\n", "expected a mapping"),
    ("teacher: {epochs: 2\n", "not valid YAML"),
    # whole-recipe checks: each used to surface only after the stages before it had trained (or never)
    ("export: {precisions: [fp32, int3]}\n", "export.precisions: 'int3' is not one of fp32, int8, int4"),
    ("evaluate: {split: test}\n", "evaluate.split: 'test' is not a split dpq reads"),
    ("evaluate: {split: devv}\n", "(did you mean 'dev'?)"),
    ("evaluate: {batch_sizes: [1, 0]}\n", "evaluate.batch_sizes: a list of integers >= 1"),
    ("evaluate: {batch_sizes: []}\n", "evaluate.batch_sizes: a list of integers >= 1"),
    ("quantize: {symmetric: false}\n", "quantize.symmetric: QAT learns symmetric step sizes"),
    ("quantize: {bits: 8}\n", "export.precisions: int4 needs quantize.bits: 4 (got 8)"),
    ("quantize: {enabled: false}\n", "export.precisions: int4 exports the quantize stages' 4-bit models"),
    ("quantize: {methods: []}\n", "export.precisions: int4 exports the quantize stages' 4-bit models"),
    ("quantize: {ensemble: true, hidden_weight: 1.0}\n", "quantize.ensemble: ensemble distillation uses logits"),
    ("prune: {prune_start: 0.8, prune_end: 0.2}\n", "prune.prune_start (0.8) must not be after"),
])
def test_bad_recipes(tmp_path, text, message):
    with pytest.raises(DpqError) as e:
        load_recipe(write(tmp_path, text))
    assert message in str(e.value)


@pytest.mark.parametrize("text", [
    "quantize: {symmetric: false, methods: [gptq]}\n",
    "quantize: {bits: 8}\nexport: {precisions: [fp32, int8]}\n",
    "quantize: {enabled: false}\nexport: {enabled: false}\n",
    "evaluate: {split: validation, batch_sizes: [4]}\n",
])
def test_consistent_recipes_load(tmp_path, text):
    load_recipe(write(tmp_path, text))


def test_unknown_profile(tmp_path):
    with pytest.raises(DpqError, match="no profile 'fats'"):
        load_recipe(write(tmp_path, "profiles: {fast: {}}\n"), "fats")


def test_missing_recipe(tmp_path):
    with pytest.raises(DpqError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
