"""Survey prunekit on timm CNNs that tests/test_timm_pruning.py does NOT cover.

Per model, as the tests do it: ``timm.create_model(name, pretrained=False, num_classes=10)``
in eval mode with randomised norms, the smallest input of ``SIZES`` it accepts (batch 2),
``prunekit.prune(model, x[:1], criterion="l1", ratio=0.5, ignore=[classifier])``; the output
is compared with the unpruned model with the removed channels zeroed, and a train-mode
backward must give finite gradients. Models that normalise over channels (LayerNorm,
GroupNorm, GRN, RMS, EvoNorm-S) or standardise conv weights (StdConv) cannot equal the
zeroed reference (SHAPES_ONLY in the test file): their mismatch is "expected".

Every model runs in its own process (``--one NAME --out RECORD.json``) under a timeout, so a
crash, hang or OOM kill is recorded, not fatal. JSON and Markdown are rewritten atomically
after every model; models already in the JSON are skipped (``--force`` redoes them).

    nice -n 19 python benchmarks/timm_survey.py                 # default list (~15-25 min)
    python benchmarks/timm_survey.py --models dla34 resnet34    # a few models
    python benchmarks/timm_survey.py --report-only              # re-render the Markdown
"""
from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timm_survey_report import render, summary_counts, verdict  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing prunekit

from prunekit.files import atomic_write_json, atomic_write_text  # noqa: E402

DEFAULT_OUT = HERE / "results" / "timm_survey.json"
TEST_FILE = REPO / "tests" / "test_timm_pruning.py"
SIZES = (64, 96, 128, 160, 224, 256, 299)
TIMEOUT_S = 400
SETUP = ("timm.create_model(name, pretrained=False, num_classes=10).eval(), BN/GN/LN statistics "
         "and affines randomised, smallest input of " + "/".join(map(str, SIZES)) + " px the "
         "unpruned model accepts, batch 2; prunekit.prune(model, x[:1], criterion='l1', "
         "ratio=0.5, ignore=[model.get_classifier()]); 'equal masked' = allclose(rtol 1e-4, "
         "atol 1e-5*scale) to the original with the removed channels zeroed; backward in train "
         "mode with finite gradients for every parameter; one process per model, "
         f"timeout {TIMEOUT_S} s, torch 1 thread")

# 90 timm CNNs outside the test list: other sizes/variants of the tested families and a few
# families the tests do not have (VGG, Inception-v4/ResNet-v2, EdgeNeXt, PoolFormer, ...).
DEFAULT_MODELS = """
cs3darknet_focus_s cspdarknet53 cspresnext50 darknetaa53 densenetblur121d dla34 dla60x_c
dla60_res2net dm_nfnet_f0 dpn68 ecaresnetlight eca_nfnet_l0 ecaresnext26t_32x4d
edgenext_xx_small efficientnet_es efficientnet_lite0 efficientnetv2_rw_t ese_vovnet19b_slim
fbnetv3_b gcresnext26ts ghostnetv3_050 ghostnet_100 hardcorenas_f hgnetv2_b1 hgnet_small
hrnet_w18_small_v2 inception_v4 inception_resnet_v2 lcnetv2_small lcnet_100 legacy_xception
legacy_seresnet18 mixnet_m tf_mixnet_s mnasnet_100 mobilenet_edgetpu_v2_xs
mobilenetv3_large_100 tf_mobilenetv3_small_075 mobilenetv4_conv_medium
mobilenetv4_hybrid_medium mobileone_s1 nf_regnet_b0 nf_ecaresnet26 nfnet_l0 poolformerv2_s12
rdnet_tiny regnetv_040 regnetx_004 regnety_004 regnetz_b16 regnetz_c16_evos repghostnet_080
repvgg_b0 repvit_m1_0 res2next50 res2net50_26w_4s resnet10t resnet34 resnet50d resnetrs50
resnetv2_50 resnetv2_50x1_bit resnext50_32x4d rexnetr_100 selecsls42 semnasnet_075
seresnetaa50d skresnext50_32x4d spnasnet_100 tf_efficientnet_b0 tinynet_a vgg11_bn
wide_resnet50_2 resnet50_gn gernet_m cs3edgenet_x cs3se_edgenet_x fastvit_sa12
efficientvit_b0 mambaout_femto starnet_s1 fasternet_t1 inception_next_tiny convnext_femto_ols
convnextv2_femto cspresnet50d darknet21 mobileone_s4 xception65 convmixer_768_32
""".split()


def tested_models() -> set[str]:
    """MODELS of tests/test_timm_pruning.py, read from its FAMILIES literal (importing the
    test module would need pytest and its fixtures)."""
    tree = ast.parse(TEST_FILE.read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "FAMILIES":
            return {name for names in ast.literal_eval(node.value).values() for name in names}
    raise RuntimeError(f"no FAMILIES dict in {TEST_FILE}")


# ----------------------------------------------------------------- one model (child process)
def _randomize_norms(model, seed: int = 0) -> None:
    """tests/conftest.py's _randomize_norms, but a missing affine tensor is skipped
    (GroupNorm1/LayerNorm2d with bias=False have a weight and no bias)."""
    import torch
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        if t is not None:
            t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                uniform(mod.running_mean, -0.2, 0.2)
                uniform(mod.running_var, 0.5, 2.0)
            if isinstance(mod, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                uniform(mod.weight, 0.5, 1.5)
                uniform(mod.bias, -0.2, 0.2)


def channel_coupling(model) -> tuple[dict[str, str], list[str]]:
    """Layers whose output depends on all channels together (class name -> why), and the
    weight-standardising convs: both make 'equal to the zeroed reference' impossible."""
    import torch
    norms, std_convs = {}, set()
    for mod in model.modules():
        name = type(mod).__name__
        if isinstance(mod, torch.nn.GroupNorm):
            norms[name] = "GroupNorm statistics over channels"
        elif isinstance(mod, torch.nn.LayerNorm):
            norms[name] = "LayerNorm over channels"
        elif "RmsNorm" in name:
            norms[name] = "RMS norm over channels"
        elif name.startswith("GlobalResponseNorm"):
            norms[name] = "GRN mean over channels"
        elif name.startswith("EvoNorm2dS"):
            norms[name] = "EvoNorm-S group statistics"
        elif "StdConv" in name:
            std_convs.add(name)
    return norms, sorted(std_convs)


def _first_tensor(out):
    return out if not isinstance(out, (tuple, list)) else out[0]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:400]


def _where(exc: BaseException) -> str:
    """Last prunekit frame of the innermost exception that passed through prunekit (prune
    re-raises failures after surgery as a GraphError whose own frames say little)."""
    import traceback
    import prunekit
    package = Path(prunekit.__file__).resolve().parent
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for err in reversed(chain):
        frames = traceback.extract_tb(err.__traceback__)
        ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(package)]
        if ours:
            f = ours[-1]
            return f"{Path(f.filename).resolve().relative_to(package.parent)}:{f.lineno} {f.name}"
    frames = traceback.extract_tb(chain[0].__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"


def _error_fields(exc: BaseException) -> dict:
    return {"error_class": type(exc).__name__, "error": _first_line(exc), "error_where": _where(exc)}


def survey_one(name: str, save) -> dict:
    """Build, prune, compare and train one model; ``save(record)`` after every stage so a
    crash still leaves the stage it reached."""
    import copy
    import torch
    import timm
    import prunekit
    torch.set_num_threads(1)
    rec = {"model": name, "stage": "build"}
    save(rec)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    head = model.get_classifier()
    prunable_head = head is not None and not isinstance(head, torch.nn.Identity)
    rec["classifier"] = next((n for n, m in model.named_modules() if m is head), None) if prunable_head else None
    rec["classifier_type"] = type(head).__name__
    norms, std_convs = channel_coupling(model)
    rec["channel_norms"], rec["std_conv"] = norms, std_convs
    rec["stage"] = "input size"
    save(rec)
    for size in SIZES:
        try:
            with torch.no_grad():
                model(torch.randn(2, 3, size, size))
            rec["size"] = size
            break
        except Exception as exc:  # too small for this stem/stride: try the next size
            rec.setdefault("size_errors", {})[str(size)] = _first_line(exc)[:120]
    if "size" not in rec:
        raise RuntimeError(f"no input size of {SIZES} works")
    x = torch.randn(2, 3, rec["size"], rec["size"], generator=torch.Generator().manual_seed(1))
    _randomize_norms(model, 0)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        before = _first_tensor(model(x))
    shapes_before = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    rec["stage"] = "prune"
    save(rec)
    t1 = time.perf_counter()
    try:
        result = prunekit.prune(model, x[:1], criterion="l1", ratio=0.5,
                                ignore=[head] if prunable_head else [])
    except Exception as exc:
        rec.update(status="prune-error", prune_s=round(time.perf_counter() - t1, 2), **_error_fields(exc))
        after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        changed = sorted(k for k in shapes_before.keys() | after.keys() if shapes_before.get(k) != after.get(k))
        rec["model_modified_on_error"] = len(changed)
        rec["modified_examples"] = changed[:4]
        return rec
    rec["prune_s"] = round(time.perf_counter() - t1, 2)
    rec.update(macs_before=result.macs_before, macs_after=result.macs_after,
               params_before=result.params_before, params_after=result.params_after,
               macs_red=round(result.macs_reduction, 4), params_red=round(result.params_reduction, 4),
               groups_pruned=len(result.plan), groups_total=len(result.group_sizes),
               unreached=list(result.unreached_modules))

    rec["stage"] = "compare"
    save(rec)
    try:
        graph = prunekit.build_graph(reference, x[:1], ignore=[rec["classifier"]] if rec["classifier"] else [])
        prunekit.zero_removed_channels(reference, graph, result.plan)
        model.eval()
        with torch.no_grad():
            after = _first_tensor(model(x))
            zeroed = _first_tensor(reference(x))
        rec["shape_ok"] = tuple(after.shape) == tuple(before.shape) == tuple(zeroed.shape)
        scale = max(float(zeroed.abs().max()), 1e-12)
        rec["rel_diff"] = float((after - zeroed).abs().max()) / scale
        rec["equal_masked"] = bool(torch.allclose(after, zeroed, rtol=1e-4, atol=1e-5 * scale))
        rec["changed_vs_original"] = not torch.allclose(
            after, before, rtol=1e-3, atol=1e-4 * float(before.abs().max()))
    except Exception as exc:
        rec["compare_error"] = "{error_class}: {error} @ {error_where}".format(**_error_fields(exc))

    rec["stage"] = "backward"
    save(rec)
    try:
        trained = copy.deepcopy(model).train()
        _first_tensor(trained(x)).float().pow(2).mean().backward()
        bad = [n for n, p in trained.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
        rec["backward_ok"] = not bad
        if bad:
            rec["backward_bad"] = bad[:4]
    except Exception as exc:
        rec["backward_ok"] = False
        rec["backward_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
    rec["status"] = "ok"
    return rec


def run_child(name: str, out: Path) -> None:
    save = lambda rec: atomic_write_json(out, rec, indent=1)  # noqa: E731
    try:
        rec = survey_one(name, save)
    except Exception as exc:  # the model could not be built or run unpruned
        rec = json.loads(out.read_text()) if out.exists() else {"model": name}
        rec.update(status="setup-error", **_error_fields(exc))
    rec.pop("stage", None)
    save(rec)


# ----------------------------------------------------------------- the survey (parent)
def run_isolated(name: str, timeout: float, workdir: Path) -> dict:
    """One model in a fresh process; a crash or timeout becomes a record too."""
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(out)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        failure = None if proc.returncode == 0 else ("crash", f"exit code {proc.returncode}", proc.stderr)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        failure = ("timeout", f"no result after {timeout:.0f} s", stderr)
    rec = json.loads(out.read_text()) if out.exists() else {"model": name}
    if failure or "status" not in rec:
        status, what, stderr = failure or ("crash", "no status written", "")
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
        rec.update(status=status, error_class=status, error=f"{what} in stage {rec.pop('stage', 'import')}"
                   + (f": {tail[0][:300]}" if tail else ""))
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["surveyed_at"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return rec


def environment() -> dict:
    import platform
    import timm
    import torch
    import prunekit
    from machine import cpu_name  # benchmarks/machine.py
    return {"timm": timm.__version__, "torch": torch.__version__, "prunekit": prunekit.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "setup": SETUP}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", help="timm names (default: the 90 built-in ones)")
    ap.add_argument("--exclude-tested", action=argparse.BooleanOptionalAction, default=True,
                    help="drop models that tests/test_timm_pruning.py already prunes (default on)")
    ap.add_argument("--force", action="store_true", help="redo models already in the JSON")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="survey JSON (Markdown next to it)")
    ap.add_argument("--one", metavar="NAME", help="internal: survey one model, write --out")
    ap.add_argument("--report-only", action="store_true", help="re-render the Markdown only")
    args = ap.parse_args(argv)
    if args.one:
        run_child(args.one, args.out)
        return 0

    survey = json.loads(args.out.read_text()) if args.out.exists() else {"models": {}}
    if args.report_only:
        atomic_write_text(args.out.with_suffix(".md"), render(survey, DEFAULT_MODELS, SETUP))
        return 0
    from tqdm import tqdm
    survey["environment"] = env = environment()
    names = list(dict.fromkeys(args.models or DEFAULT_MODELS))
    if args.exclude_tested:
        tested = tested_models()
        if skipped := [n for n in names if n in tested]:
            print(f"skipping {len(skipped)} models tests/test_timm_pruning.py prunes: {' '.join(skipped)}")
        names = [n for n in names if n not in tested]
    todo = [n for n in names if args.force or n not in survey["models"]]
    print(f"{len(names) - len(todo)} of {len(names)} models already in {args.out}; surveying {len(todo)}"
          f" (timm {env['timm']}, torch {env['torch']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="timm_survey.") as workdir:
        bar = tqdm(todo, unit="model")
        for name in bar:
            bar.set_postfix_str(name)
            rec = run_isolated(name, args.timeout, Path(workdir))
            survey["models"][name] = rec
            survey["updated"] = rec["surveyed_at"]
            atomic_write_json(args.out, survey, indent=1)
            atomic_write_text(args.out.with_suffix(".md"), render(survey, DEFAULT_MODELS, SETUP))
            kind, reason = verdict(rec)
            bar.write(f"{name}: {kind}{f' ({reason})' if reason else ''}")
    counts = summary_counts(survey["models"].values())
    print(f"wrote {args.out} and {args.out.with_suffix('.md').name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
