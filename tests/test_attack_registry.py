"""The attack registry (make_attack, list_attacks, requirements), the Attack interface and its
AttackResult, and the ensemble's record of which component broke which input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adasmooth.attacks import (
    ATTACK_DESCRIPTIONS,
    ATTACK_NAMES,
    ATTACKS,
    Attack,
    AttackResult,
    EnsembleAttack,
    attack_description,
    check_attack_requirements,
    list_attacks,
    make_attack,
)
from adasmooth.core.errors import ConfigError, MissingDependencyError
from adasmooth.evaluate.robustness import evaluate_robustness
from adasmooth.mixing.fixed import MixedClassifier

EPS = 0.1
FAST = {"pgd_steps": 2, "apgd_steps": 3, "n_target_classes": 2}


class Linear(nn.Module):
    """z = W x + b on flattened (N, 1, 4, 4) inputs: logits and margins computable by hand."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def linear_model(seed: int, classes: int = 5) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    return Linear(torch.randn(classes, 16, generator=gen), 0.1 * torch.randn(classes, generator=gen))


@pytest.fixture(scope="module")
def plain():
    return linear_model(0)


@pytest.fixture(scope="module")
def mixed():
    return MixedClassifier(linear_model(1), linear_model(2), alpha=0.6).eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(12, 1, 4, 4, generator=gen), torch.randint(0, 5, (12,), generator=gen)


class Shift(Attack):
    """A test attack: moves every pixel by +eps (clipped to [0, 1]), nothing else."""

    def __call__(self, x, y):
        return (x + self.eps).clamp(0, 1)


@pytest.fixture
def shift_registered():
    @ATTACKS.register("test-shift", description="moves every pixel up by eps", options=("shift_unused",))
    def build(model, eps, norm, seed, batch_size, shift_unused=None):
        return Shift(model, eps, norm, seed)

    yield "test-shift"
    ATTACKS.remove("test-shift")


@pytest.fixture
def needs_missing_package():
    @ATTACKS.register("test-needs", description="needs a package that is not installed",
                      requires="adasmooth_test_no_such_package")
    def build(model, eps, norm, seed, batch_size):
        return Shift(model, eps, norm, seed)

    yield "test-needs"
    ATTACKS.remove("test-needs")


# ------------------------------------------------------------------ the registry


def test_every_registered_attack_builds_and_runs(plain, mixed, batch):
    x, y = batch
    names = list_attacks()
    assert {"pgd", "apgd-ce", "apgd-dlr", "apgd-t", "autoattack", "A", "B", "C", "D", "std", "rob"} <= set(names)
    for name in names:
        info = ATTACKS.info(name)
        assert attack_description(name) and attack_description(name) != name
        model = mixed if info.get("mixed_only") else plain
        attack = make_attack(name, model, EPS, seed=0, batch_size=12, **FAST)
        assert isinstance(attack, Attack), name
        if info.get("requires"):  # AutoAttack: building is enough here (test_autoattack runs it)
            continue
        result = attack.run(x, y)
        assert isinstance(result, AttackResult)
        assert ((result.x_adv - x).abs().flatten(1).amax(1) <= EPS + 1e-6).all(), name
        with torch.no_grad():
            predicted = model(result.x_adv).argmax(1)  # judged on the attacked model, also for transfer attacks
        assert torch.equal(result.predicted, predicted), name
        assert torch.equal(result.fooled, predicted != y), name
        assert len(result.broken_by) == len(y)


def test_unknown_attack_lists_the_known_ones(plain):
    with pytest.raises(ConfigError, match="unknown attack 'no-such-attack-xyz'") as err:
        make_attack("no-such-attack-xyz", plain, EPS)
    for name in ("pgd", "apgd-ce", "apgd-t", "D"):
        assert name in str(err.value)


def test_mixed_only_attacks_refuse_a_plain_model(plain):
    mixed_only = [n for n in list_attacks() if ATTACKS.info(n).get("mixed_only")]
    assert set(mixed_only) >= {"A", "B", "C", "D", "std", "rob", "surrogate"}  # the built-ins; others may join
    assert set(list_attacks(plain)) == set(list_attacks()) - set(mixed_only)
    for name in mixed_only:
        with pytest.raises(ConfigError, match=f"attack '{name}' needs a mixed classifier") as err:
            make_attack(name, plain, EPS)
        usable = str(err.value).partition("Use ")[2].rstrip(".").split(", ")  # it says what does work on this model
        assert {"pgd", "apgd-ce"} <= set(usable) and not set(usable) & set(mixed_only)


def test_unknown_option_is_refused(plain):
    with pytest.raises(ConfigError, match="unknown attack option"):
        make_attack("pgd", plain, EPS, pgd_stesp=3)
    # an option another attack declares is accepted and not passed on
    assert make_attack("pgd", plain, EPS, adaptive_weight=0.3).steps == 20
    assert make_attack("pgd", plain, EPS, pgd_steps=7).steps == 7


def test_a_registered_attack_works_through_make_attack_and_evaluate(shift_registered, plain, batch):
    x = batch[0]
    with torch.no_grad():
        y = plain(x).argmax(1)
    y[0] = (y[0] + 1) % 5  # one input misclassified when clean
    eps = 0.3
    assert shift_registered in list_attacks() and shift_registered in ATTACK_NAMES
    assert ATTACK_DESCRIPTIONS[shift_registered] == "moves every pixel up by eps"
    attack = make_attack(shift_registered, plain, eps)
    assert torch.equal(attack(x, y), (x + eps).clamp(0, 1))
    report = evaluate_robustness(plain, (x, y), attacks=["pgd", shift_registered], eps=eps, batch_size=5,
                                 progress=False, attack_options={"shift_unused": 1})
    with torch.no_grad():
        clean_ok = plain(x).argmax(1) == y
        shifted_ok = plain((x + eps).clamp(0, 1)).argmax(1) == y
    expected = clean_ok & shifted_ok
    assert expected.any() and (clean_ok & ~shifted_ok).any()  # the outcome below is not trivial
    assert report.robust[shift_registered] == expected.tolist()
    assert report.to_dict()["attacks"][shift_registered] == "moves every pixel up by eps"


def test_the_registered_attack_is_gone_after_its_fixture(plain):
    assert "test-shift" not in list_attacks()
    with pytest.raises(ConfigError):
        make_attack("test-shift", plain, EPS)


def test_missing_package_is_reported_before_any_work(needs_missing_package, plain, batch):
    with pytest.raises(MissingDependencyError, match="adasmooth_test_no_such_package"):
        check_attack_requirements(["pgd", needs_missing_package])
    with pytest.raises(MissingDependencyError):
        make_attack(needs_missing_package, plain, EPS)
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return plain(x)

    with pytest.raises(MissingDependencyError, match=f"attack '{needs_missing_package}'"):
        evaluate_robustness(Counting(), batch, attacks=["pgd", needs_missing_package], eps=EPS, progress=False)
    assert calls == []
    check_attack_requirements(["pgd", "apgd-t"])  # no requirement: no error


# ------------------------------------------------------------------ AttackResult and the interface


class FixedPoints(Attack):
    """Returns points given in advance, so that the result can be checked by hand."""

    def __init__(self, model, points):
        super().__init__(model, eps=1.0)
        self.points = points

    def __call__(self, x, y):
        return self.points


def test_attack_result_by_hand_on_a_linear_model():
    weight = torch.zeros(3, 16)
    weight[0, 0], weight[1, 1], weight[2, 2] = 1.0, 2.0, -1.0
    model = Linear(weight, torch.tensor([0.0, 0.0, 0.5]))
    points = torch.zeros(3, 1, 4, 4)
    points.view(3, 16)[0, 0] = 1.0  # logits (1, 0, 0.5)
    points.view(3, 16)[1, 1] = 1.0  # logits (0, 2, 0.5)
    points.view(3, 16)[2, 2] = 0.2  # logits (0, 0, 0.3)
    y = torch.tensor([0, 0, 2])
    result = FixedPoints(model, points).run(torch.zeros_like(points), y)
    # margin = max_{j != y} z_j - z_y
    assert torch.allclose(result.margin, torch.tensor([0.5 - 1.0, 2.0 - 0.0, 0.0 - 0.3]))
    assert result.fooled.tolist() == [False, True, False]
    assert result.predicted.tolist() == [0, 1, 2]
    assert ((result.margin > 0) == result.fooled).all()
    assert result.broken_by == [None, None, None] and result.flags == []
    assert result.x_adv is points


def test_attack_base_checks_arguments_and_needs_call(plain, batch):
    with pytest.raises(ValueError, match="eps"):
        Shift(plain, -0.1)
    with pytest.raises(ValueError, match="norm"):
        Shift(plain, 0.1, norm="l1")
    with pytest.raises(NotImplementedError, match="__call__"):
        Attack(plain, 0.1).run(*batch)


# ------------------------------------------------------------------ ensembles


def test_ensemble_credits_each_input_to_the_component_that_broke_it():
    weight = torch.zeros(2, 16)
    weight[1, 0] = 1.0  # class 1 wins iff pixel 0 > 0.5
    model = Linear(weight, torch.tensor([0.5, 0.0]))
    x = torch.zeros(4, 1, 4, 4)
    x.view(4, 16)[3, 0] = 1.0  # input 3 is misclassified before any attack
    y = torch.zeros(4, dtype=torch.long)
    seen: dict[str, list[int]] = {"first": [], "second": [], "third": []}

    def breaks(name, target):
        """A component that breaks the input whose pixel 1 holds ``target`` (inputs are tagged below)."""
        def attack(xs, ys):
            seen[name].append(xs.shape[0])
            out = xs.clone()
            hit = xs.view(len(xs), 16)[:, 1] == target
            out.view(len(xs), 16)[hit, 0] = 1.0
            return out
        return attack

    for i in range(4):
        x.view(4, 16)[i, 1] = i / 10  # a tag that survives selection of rows
    ensemble = EnsembleAttack(model, [("first", breaks("first", 0.0)), ("second", breaks("second", 0.1)),
                                      ("third", breaks("third", 0.9))], eps=1.0)
    assert ensemble.components == ("first", "second", "third")
    result = ensemble.run(x, y)
    assert result.broken_by == ["first", "second", None, "clean"]
    assert result.fooled.tolist() == [True, True, False, True]
    # each component ran only on the inputs still correctly classified
    assert seen == {"first": [3], "second": [2], "third": [1]}
    assert torch.equal(ensemble(x, y), result.x_adv)
    with pytest.raises(ConfigError, match="at least one attack"):
        EnsembleAttack(model, [], eps=1.0)


def test_evaluation_records_the_ensemble_components(mixed, batch):
    x, y = batch
    report = evaluate_robustness(mixed, (x, y), attacks=["D", "B"], eps=0.3, batch_size=12, progress=False,
                                 attack_options=FAST)
    assert set(report.component_broken_by) == {"D"}  # only attacks made of parts have components
    components = report.component_broken_by["D"]
    assert len(components) == len(y)
    parts = set(make_attack("D", mixed, 0.3, **FAST).components)
    for i, comp in enumerate(components):
        if report.clean_correct[i] and report.robust["D"][i] is False:
            assert comp in parts
        else:
            assert comp is None
    assert any(c is not None for c in components)  # the check above has teeth
