"""Soft pruning's schedules against direct implementations of their definitions: ASFP's exact
rate (D = 1/8), the decay factor of soft masks (SRFP/GHFP exponential, annealing decay),
GHFP's hard fraction, and what SoftPruning does with them to a tiny model's weights."""
import math

import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.methods import SoftPruning, get_method, soft_prune
from prunekit.methods.soft_schedules import (asfp_xi, asymptotic_rate, decay_factor,
                                             hard_fraction)
from prunekit.recipes import load_recipe
from prunekit.train import TrainConfig, fit

from conftest import TinyNet, tiny_data

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def new_tiny(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def config(**kw):
    base = dict(epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant",
                batch_size=8, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def started(model, optimizer=None, **kw):
    hook = SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8),
                       **{"criterion": "l2", "ratio": 0.5, **kw})
    hook.on_train_start(model, optimizer)
    hook.on_epoch_start(0)
    return hook


def masked(hook, group):
    return sorted(set(range(hook.graph.by_name[group].size)) - set(hook.plan[group]))


def lowest_l2(conv, count):
    """The definition of SFP's mask: the ``count`` filters of smallest L2 norm."""
    norms = conv.weight.detach().double().flatten(1).norm(dim=1)
    return sorted(torch.argsort(norms, stable=True)[:count].tolist())


# ------------------------------------------------------------------------------ ASFP's rate
@pytest.mark.parametrize("epochs", [2, 3, 9, 40, 200, 201])
@pytest.mark.parametrize("d, point", [(1 / 8, 0.75), (0.25, 0.75), (0.3, 0.6)])
def test_asfp_rate_hits_its_three_points(epochs, d, point):
    target = 0.4
    assert asymptotic_rate(target, 0, epochs, d, point) == 0
    assert asymptotic_rate(target, d * (epochs - 1), epochs, d, point) == \
        pytest.approx(point * target, abs=1e-12)
    assert asymptotic_rate(target, epochs - 1, epochs, d, point) == target
    grid = [i / 4 for i in range(4 * (epochs - 1) + 1)]  # monotone between epochs too
    rates = [asymptotic_rate(target, e, epochs, d, point) for e in grid]
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert asymptotic_rate(target, epochs + 3, epochs, d, point) == target


def test_asfp_default_is_d_one_eighth_and_matches_the_notes_table():
    # related_methods_2.md 1.1-1.2: xi = 0.2500114 (FSDP's numpy root) and the table, E = 200
    assert asfp_xi() == pytest.approx(0.2500114, abs=5e-8)
    xi = asfp_xi()
    assert 0.75 * xi ** 8 - xi + 0.25 == pytest.approx(0, abs=1e-15)
    table = {1: 0.0217, 10: 0.171, 25: 0.301, 50: 0.375, 100: 0.399, 199: 0.400}
    for epoch, rate in table.items():
        assert asymptotic_rate(0.4, epoch, 200) == pytest.approx(rate, abs=6e-4)
    # the closed form of the notes: P(e) = P (1 - xi^(8 e / T)) / (1 - xi^8), T = E - 1
    for epoch in range(199):
        assert asymptotic_rate(0.4, epoch, 200) == \
            pytest.approx(0.4 * (1 - xi ** (8 * epoch / 199)) / (1 - xi ** 8), rel=1e-12)


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 10, 40, 200])
def test_old_schedule_is_d_quarter_approximate(epochs):
    def old(e):  # prunekit before the fix: k = 4 ln 4 / E, normalised, target at E - 1
        if e >= epochs - 1:
            return 0.4
        k = 4 * math.log(4) / epochs
        return 0.4 * (1 - math.exp(-k * e)) / (1 - math.exp(-k * (epochs - 1)))
    for e in range(epochs + 1):
        assert asymptotic_rate(0.4, e, epochs, d=0.25, fit="approximate") == old(e)


@pytest.mark.parametrize("kw, message", [
    ({"asfp_d": 0}, "asfp_d must be a number in"), ({"asfp_d": 1.0}, "asfp_d must be"),
    ({"asfp_point": 1.2}, "asfp_point must be"), ({"asfp_d": 0.8}, "must exceed asfp_d"),
    ({"asfp_fit": "closest"}, "unknown asfp_fit"), ({"decay": "cosine"}, "unknown decay"),
    ({"decay": "anneal", "decay_start": 1.5}, "decay_start must be"),
    ({"hard_fraction": "linear"}, "unknown hard_fraction"),
    ({"decay_start": 0.5}, "decay_start sets the first decay factor"),
    ({"decay": "anneal", "epochs": None}, "decay='anneal' needs epochs"),
    ({"hard_fraction": "cubic", "epochs": 0}, "hard_fraction='cubic' needs epochs"),
])
def test_soft_pruning_rejects_bad_schedule_options(kw, message):
    with pytest.raises(ValueError, match=message):
        SoftPruning(model=new_tiny(), example_inputs=torch.randn(1, 3, 8, 8), ratio=0.5,
                    **{"epochs": 10, **kw})


@pytest.mark.parametrize("values, message", [
    ({"asfp_d": 0.9}, "must exceed asfp_d"), ({"asfp_point": 0}, "asfp_point must be"),
    ({"decay_start": -0.1, "decay": "anneal"}, "decay_start must be"),
    ({"decay": "linear"}, "decay must be one"),
    ({"hard_fraction": "quadratic"}, "hard_fraction must be one"),
    ({"asfp_fit": "rough"}, "asfp_fit must be one"),
])
def test_method_configs_reject_bad_schedule_options(values, message):
    for name in ("sfp", "asfp", "ghfp", "fpgm-soft"):
        with pytest.raises(ConfigError, match=message):
            get_method(name).Config.from_dict(values)


def test_methods_default_schedules():
    ghfp, asfp = get_method("ghfp")().config, get_method("asfp")().config
    assert (ghfp.schedule, ghfp.decay, ghfp.hard_fraction) == ("asymptotic", "exponential",
                                                               "cubic")
    assert (asfp.asfp_d, asfp.asfp_point, asfp.asfp_fit) == (0.125, 0.75, "exact")
    assert get_method("sfp")().config.decay == "none"
    with pytest.raises(ConfigError, match="give decay='exponential'"):
        get_method("sfp").Config.from_dict({"decay_start": 0.5})
    assert get_method("ghfp").Config.from_dict({"decay_start": 1.0}).decay_start == 1.0


# ------------------------------------------------------------- decay factor, hard fraction
def pgmpf_masks(epochs, a0):
    """PGMPF's loop (pruning_resnet_soft_hard.py, soft_to_hard): (alpha, lambda) of the mask
    applied before training, then after every epoch e."""
    sigma = 1e-5
    c = -math.log(sigma / (a0 + 0.01 * sigma)) / epochs
    out = [(a0 * math.exp(-c * 0), 1 - (1 - 1 / (epochs + 1e-7)) ** 3)]
    for e in range(epochs):
        alpha = 0 if e >= epochs * 9 / 10 else a0 * math.exp(-c * e)
        out.append((alpha, 1 - (1 - (e + 1) / (epochs + 1e-7)) ** 3))
    return out  # entry u: the mask used during epoch u


def anneal_masks(epochs):
    """The annealing-decay fork's loop: decay_rate 0 before training, then at epoch e
    max(0, float('%.4f' % (1 - 2 e / E)))."""
    return [0.0] + [max(0.0, float("%.4f" % (1 - 2 * e / epochs))) for e in range(epochs)]


@pytest.mark.parametrize("epochs", [10, 20, 200])
@pytest.mark.parametrize("a0", [0.5, 1.0, 0.0])
def test_exponential_decay_and_cubic_hard_fraction_follow_pgmpf(epochs, a0):
    reference = pgmpf_masks(epochs, a0)
    for u in range(epochs - 1):  # the last epoch: prunekit's rule, below
        alpha, lam = reference[u]
        assert decay_factor("exponential", u, epochs, a0) == pytest.approx(alpha, rel=1e-12,
                                                                           abs=1e-15)
        assert hard_fraction("cubic", u, epochs) == pytest.approx(lam, rel=1e-6)
    assert decay_factor("exponential", epochs - 1, epochs, a0) == 0
    assert hard_fraction("cubic", epochs - 1, epochs) == 1
    assert decay_factor("exponential", 0, epochs) == 0.5  # PGMPF's --mask_0_decay default
    lams = [hard_fraction("cubic", u, epochs) for u in range(1, epochs)]
    assert all(b > a for a, b in zip(lams, lams[1:]))
    assert hard_fraction("none", 3, epochs) == decay_factor("none", 3, epochs) == 0


@pytest.mark.parametrize("epochs", [4, 10, 300])
def test_anneal_decay_follows_the_fork(epochs):
    reference = anneal_masks(epochs)
    for u in range(epochs - 1):
        assert decay_factor("anneal", u, epochs) == reference[u]
    assert decay_factor("anneal", epochs - 1, epochs) == 0
    assert decay_factor("anneal", 1, epochs) == 1.0
    assert decay_factor("anneal", 2, epochs, start=0.5) == float("%.4f" % (0.5 * (1 - 2 / epochs)))


# -------------------------------------------------------------- what the hook does to weights
def test_decay_multiplies_exactly_what_zeroing_zeroes():
    model = new_tiny()
    model.train()
    with torch.no_grad():  # non-trivial BN state
        model(torch.randn(16, 3, 8, 8))
        model.bn1.bias.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = lowest_l2(model.conv1, 4)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        out_before = model.bn1(model.conv1(x))
    hook = started(model, decay="exponential", decay_start=0.5, epochs=10)
    assert masked(hook, "conv1") == rows and hook.hard == {}
    factor = torch.ones(8)
    factor[rows] = 0.5  # alpha(0) = a0
    view = factor.view(8, 1, 1, 1)
    assert torch.equal(model.conv1.weight, before["conv1.weight"] * view)
    for name in ("conv1.bias", "bn1.bias", "bn1.running_mean"):
        assert torch.equal(model.state_dict()[name], before[name] * factor)
    for name in ("bn1.weight", "bn1.running_var"):
        assert torch.equal(model.state_dict()[name], before[name])
    kept2 = hook.plan["conv2"]  # consumer columns untouched (conv2's kept rows: all of it)
    assert torch.equal(model.conv2.weight[kept2], before["conv2.weight"][kept2])
    with torch.no_grad():  # eval mode: the masked channels' output is multiplied by alpha
        out = model.bn1(model.conv1(x))
    assert torch.allclose(out, out_before * factor.view(1, 8, 1, 1), atol=1e-6)
    # the next masks multiply the current weights again (compounding), at alpha(1), alpha(2)
    current = model.conv1.weight.detach().clone()
    hook.on_epoch_end(0)
    assert masked(hook, "conv1") == rows  # still the smallest
    assert torch.equal(model.conv1.weight[rows], current[rows] * 0.5)
    current = model.conv1.weight.detach().clone()
    hook.on_epoch_end(1)
    alpha2 = decay_factor("exponential", 2, 10, 0.5)
    assert torch.equal(model.conv1.weight[rows], current[rows] * alpha2)
    assert [h["decay"] for h in hook.history] == [0.5, 0.5, alpha2]


def test_zero_norm_weight_decays_gamma_too():
    model = new_tiny()
    gamma = model.bn1.weight.detach().clone()
    hook = started(model, decay="anneal", decay_start=0.5, epochs=10)
    hook.on_epoch_end(0)  # alpha(1) = 0.5 * 1 (alpha(0) = 0: the fork zeroes before training)
    assert torch.equal(model.bn1.weight, gamma)
    hook = started(model, decay="anneal", decay_start=0.5, epochs=10, zero_norm_weight=True)
    rows = masked(hook, "conv1")
    assert model.bn1.weight[rows].abs().max() == 0  # alpha(0) = 0
    hook.on_epoch_end(0)
    assert model.bn1.weight[rows].abs().max() == 0  # 0.5 * 0


def test_hard_share_is_the_lowest_of_the_masked_and_stays_zero(tmp_path):
    model = new_tiny()
    with torch.no_grad():  # distinct norms: the masked set and its order are clear
        model.conv1.weight.mul_(torch.linspace(0.2, 2, 8).view(8, 1, 1, 1)[torch.randperm(8)])
    soft = SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8), criterion="l2",
                       ratio=0.5, epochs=4, decay="exponential", decay_start=1.0,
                       hard_fraction="cubic")
    expected_masked = lowest_l2(model.conv1, 4)
    # lambda(0) = 1 - (3/4)^3 = 0.578 -> floor(0.578 * 4) = 2 hard: the 2 lowest of the masked
    expected_hard = lowest_l2(model.conv1, 2)
    values = []

    class Probe:
        def after_step(self, step):
            values.append(model.conv1.weight.detach().clone())

    class Check:
        def on_epoch_start(self, epoch):
            if epoch == 0:
                assert masked(soft, "conv1") == expected_masked
                assert soft.hard["conv1"] == expected_hard

    fit(model, tiny_data(), None, config(epochs=1), tmp_path, hooks=[soft, Check(), Probe()])
    assert len(values) == 4
    hard = expected_hard
    soft_rows = sorted(set(expected_masked) - set(hard))
    for weight in values:  # hard: exactly zero after every step; soft: alpha = 1, they train
        assert weight[hard].abs().max() == 0
    assert not torch.equal(values[0][soft_rows], values[-1][soft_rows])
    # after the one epoch of a 4-epoch schedule: the mask of epoch 1
    assert soft.history[-1]["hard"] == 2 * math.floor(4 * hard_fraction("cubic", 1, 4) + 1e-9)
    buffer = soft.optimizer.state[model.conv1.weight]["momentum_buffer"]
    assert buffer[soft.hard["conv1"]].abs().max() == 0  # momentum reset at masking
    soft.on_epoch_end(2)  # the last epoch: every masked channel hard, alpha 0
    assert soft.hard["conv1"] == masked(soft, "conv1")
    assert model.conv1.weight[masked(soft, "conv1")].abs().max() == 0


def test_resume_with_decay_and_hard_matches_uninterrupted_run(tmp_path):
    data = tiny_data()
    options = dict(criterion="l2", ratio=0.5, schedule="asymptotic", epochs=3,
                   decay="exponential", decay_start=1.0, hard_fraction="cubic")

    def hook(model):
        return SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8), **options)

    full = new_tiny()
    full_hook = hook(full)
    fit(full, data, None, config(epochs=3, deterministic=True), tmp_path / "full",
        hooks=[full_hook])

    class Stop:
        def on_epoch_end(self, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    part = new_tiny()
    with pytest.raises(KeyboardInterrupt):
        fit(part, data, None, config(epochs=3, deterministic=True), tmp_path / "part",
            hooks=[hook(part), Stop()])
    resumed = new_tiny()
    resumed_hook = hook(resumed)
    fit(resumed, data, None, config(epochs=3, deterministic=True), tmp_path / "part",
        hooks=[resumed_hook])
    assert resumed_hook.plan == full_hook.plan and resumed_hook.hard == full_hook.hard
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)  # the resumed re-application did not multiply twice


def test_ghfp_soft_prune_end_to_end(tmp_path):
    model = new_tiny()
    x = torch.randn(2, 3, 8, 8)
    model, result, summary = soft_prune(
        model, tiny_data(), tiny_data(8, seed=1), config(epochs=3), tmp_path, criterion="l2",
        ratio=0.5, schedule="asymptotic", decay="exponential", hard_fraction="cubic",
        example_inputs=x[:1])
    assert summary["epochs_run"] == 3
    assert model.conv1.out_channels == 4 and result.macs_reduction > 0.4
    assert torch.isfinite(model(x)).all()


# ------------------------------------------------------------------------ recipes and CLI
def test_schedule_recipes():
    asfp, ghfp = load_recipe("asfp_resnet56_40"), load_recipe("ghfp_resnet56_40")
    decay = load_recipe("sfp_decay_resnet56_30")
    assert asfp["method"]["name"] == "asfp" and asfp["method"]["asfp_d"] == 0.125
    assert ghfp["method"] == {"name": "ghfp", "schedule": "asymptotic", "asfp_d": 0.125,
                              "decay": "exponential", "decay_start": 0.5,
                              "hard_fraction": "cubic"}
    assert decay["method"]["decay"] == "anneal" and decay["finetune"]["epochs"] == 300
    for recipe in (asfp, ghfp, decay):
        assert "reconstructed" in recipe["notes"].lower()


def test_prune_help_lists_the_schedule_options(capsys):
    from prunekit.cli import main
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--asfp-d", "--asfp-point", "--asfp-fit", "--decay {none,exponential,anneal}",
                 "--decay-start", "--hard-fraction {none,cubic}"):
        assert flag in text
    assert "ghfp: gradually hard filter pruning" in text
    assert "[methods: sfp, asfp, ghfp, fpgm-soft]" in text
