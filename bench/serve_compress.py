"""Making a trained MoE cheaper to serve, measured on this project's data: distillation into the dense twin, expert
pruning and merging (8 -> 6 -> 4 experts) with and without a healing fine-tune, quantized experts, and task-level
routing with sub-network extraction.

Setup, per corpus: `embedded` (the tiny preset exactly as `make train` trains it: data=embedded, 300 steps) and
`shakespeare` (experiment=shakespeare, the same model and steps on tinyshakespeare). Every number is a validation
loss (nats per byte) on the same --eval-batches fixed validation micro-batches of the corpus.

1. Distillation (Switch Transformer, section 5: distilling into the dense twin keeps ~30% of the sparse gain): the
   teacher = the trained tiny MoE; the dense twin (tiny_dense: the same active parameters per token) trained from
   scratch; the dense twin distilled from the teacher, with our defaults (alpha 0.5, T 2) and with Switch's mix
   (alpha 0.75, T 1), each for the teacher's steps. Kept fraction = (dense - distilled) / (dense - teacher).
2. Compression: moe-train-compress of the teacher to 6 and 4 experts per layer by every method (16 calibration
   batches of the training stream), evaluated as they are and after a healing fine-tune of --heal steps
   (init.from the compressed weights, moe.num_experts=N, peak LR --heal-lr, 5 warm-up steps); the healed losses are
   compared with the teacher healed the same way (8 experts), which extra steps improve too.
3. Quantization: moe-train-eval --quantize-experts int8 / int4 of the teacher, float32 and bf16 activations: expert
   bytes, loss delta, tokens/s against the unquantized model measured in the same call.
4. Task routing (embedded only: tinyshakespeare has no task labels): the tiny MoE with moe.router_input=task and
   token_and_task (data.task_of_domain: the six domains), trained like the teacher; per domain, the sub-network
   moe-train-compress --task extracts, its parameters and its loss on that domain's tokens (moe-train-eval --task)
   against the full model's and the token-routed teacher's.

Run (about 55 minutes on 2 CPU cores):
    python bench/serve_compress.py --json bench/results/serve_compress.json --out bench/results/serve_compress.md
Quick check (a minute): python bench/serve_compress.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere, without an installed package

from finetune import QUICK_SHAPE, run  # noqa: E402  (bench/ scripts import each other by name)
from moe_train import compress as compress_cli  # noqa: E402
from moe_train.data.embedded import DOMAINS  # noqa: E402
from moe_train.evaluate import eval_config, evaluate  # noqa: E402
from moe_train.interop.initial import open_source  # noqa: E402
from moe_train.serving.compress import METHODS  # noqa: E402

SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CORPORA = {"embedded": [], "shakespeare": ["experiment=shakespeare", f"data.path={SHAKESPEARE}"]}
# name: (distill.alpha, distill.temperature); alpha 0.75 at T = 1 is Switch's mix of 0.75 x the data's labels and
# 0.25 x the teacher's probabilities (its cross-entropy = 0.75 CE + 0.25 KL + the teacher's entropy, a constant).
DISTILL_ARMS = {"default": (0.5, 2.0), "switch": (0.75, 1.0)}
TASK_ROUTING = {"task": ["moe.router_input=task"], "token_and_task": ["moe.router_input=token_and_task"]}


@dataclass
class Settings:
    steps: int  # pre-training steps of teacher, dense twin and distilled twin (make train: 300)
    heal: int  # healing fine-tune steps
    heal_lr: float
    eval_batches: int
    sizes: tuple[int, ...]  # experts after compression
    shape: list[str]  # extra model overrides (--quick: a toy shape)


def common(s: Settings, corpus: str, steps: int) -> list[str]:
    return [*CORPORA[corpus], *s.shape, "train.progress=false", "train.log_every=50", f"train.max_steps={steps}",
            f"train.eval_batches={s.eval_batches}", f"train.eval_every={max(steps // 3, 1)}"]


def val_loss(path: str, *overrides: str, **kw) -> dict:
    """moe-train-eval of a weights file on its run's validation batches (its config travels with it)."""
    source = open_source(path)
    return evaluate(source, eval_config(source, list(overrides)), lambda message: None, **kw)


# -- 1. distillation --------------------------------------------------------------------------------------------------
def distillation(s: Settings, corpus: str, work: Path) -> dict:
    teacher = run(f"{corpus}_teacher", common(s, corpus, s.steps), work)
    dense = run(f"{corpus}_dense", ["model=tiny_dense", *common(s, corpus, s.steps)], work)
    gain = dense["final_val"] - teacher["final_val"]
    result = {"teacher": teacher, "dense": dense, "arms": {}}
    for name, (alpha, temperature) in DISTILL_ARMS.items():
        distilled = run(f"{corpus}_distilled_{name}", ["model=tiny_dense", *common(s, corpus, s.steps),
                                                       f"distill.teacher={teacher['weights']}",
                                                       f"distill.alpha={alpha}", f"distill.temperature={temperature}"],
                        work)
        kept = (dense["final_val"] - distilled["final_val"]) / gain if gain > 0 else float("nan")
        result["arms"][name] = {"alpha": alpha, "temperature": temperature, "run": distilled, "kept_fraction": kept}
    return result


# -- 2. compression ---------------------------------------------------------------------------------------------------
def compress(source: str, out: Path, *args: str) -> dict:
    parsed = compress_cli.build_parser().parse_intermixed_args([source, str(out), *args])
    return compress_cli.run(parsed)


def heal(s: Settings, corpus: str, name: str, source: str, experts: int, work: Path) -> dict:
    """A short fine-tune from `source` with `experts` experts per layer (a fresh optimizer, a lower peak LR)."""
    return run(name, [*common(s, corpus, s.heal), f"init.from={source}", f"moe.num_experts={experts}",
                      f"optim.lr={s.heal_lr}", f"optim.min_lr={s.heal_lr / 10}", "optim.warmup_steps=5"], work)


def compression(s: Settings, corpus: str, teacher: dict, work: Path) -> dict:
    base = val_loss(teacher["weights"])["val_loss"]
    # The control for healing: the uncompressed teacher fine-tuned the same way (300 steps leave it undertrained, so
    # any extra step helps; a healed arm is judged against this, not against the teacher as it is).
    experts = open_source(teacher["weights"]).moe_cfg.num_experts
    control = heal(s, corpus, f"{corpus}_teacher_healed", teacher["weights"], experts, work)["final_val"]
    arms = {}
    for n in s.sizes:
        for method in METHODS:
            name = f"{corpus}_{method}_{n}"
            out = work / f"{name}.safetensors"
            summary = compress(teacher["weights"], out, "--experts", str(n), "--method", method)
            loss = val_loss(str(out))["val_loss"]
            healed = heal(s, corpus, f"{name}_healed", str(out), n, work)
            arms[name] = {"method": method, "experts": n, "params": summary["params_after"],
                          "params_before": summary["params_before"], "val_loss": loss, "delta": loss - base,
                          "healed_val": healed["final_val"], "healed_delta": healed["final_val"] - control,
                          "healed_start": healed["step0_val"]}
            print(f"  {name}: +{loss - base:.4f}, healed +{healed['final_val'] - control:.4f}", flush=True)
    return {"base": base, "control": control, "arms": arms}


# -- 3. quantization --------------------------------------------------------------------------------------------------
def quantization(teacher: dict) -> dict:
    rows = {}
    for mp in ("none", "bf16"):
        for mode in ("int8", "int4"):
            result = val_loss(teacher["weights"], f"train.mixed_precision={mp}", quantize=mode)
            rows[f"{mode}_{mp}"] = {**result["quantization"], "val_loss": result["val_loss"],
                                    "tokens_per_s": result["tokens_per_s"], "activations": mp}
    return rows


# -- 4. task routing --------------------------------------------------------------------------------------------------
def task_routing(s: Settings, teacher: dict, work: Path) -> dict:
    results = {}
    more = f"train.eval_batches={s.eval_batches * 4}"  # a domain holds 1/6 of the tokens on average
    for kind, args in TASK_ROUTING.items():
        trained = run(f"task_{kind}", [*common(s, "embedded", s.steps), *args, "moe.num_tasks=6",
                                       "data.task_of_domain=true"], work)
        per_task = {}
        for task in DOMAINS:
            out = work / f"task_{kind}_{task}.safetensors"
            summary = compress(trained["weights"], out, "--task", task, "--calibration-batches", "64")
            per_task[task] = {"experts": summary["num_experts"], "params": summary["params_after"],
                              "params_full": summary["params_before"],
                              "full": val_loss(trained["weights"], more, task=task)["val_loss"],
                              "extracted": val_loss(str(out), more, task=task)["val_loss"],
                              "token_routed": val_loss(teacher["weights"], more, "data.task_of_domain=true",
                                                       task=task)["val_loss"]}
        results[kind] = {"run": trained, "tasks": per_task}
    return results


# -- report -----------------------------------------------------------------------------------------------------------
def distillation_table(results: dict) -> list[str]:
    lines = ["| corpus | teacher MoE | dense twin | distilled dense twin (alpha, T) | gain kept by distillation |",
             "|---|---:|---:|---:|---:|"]
    for corpus, r in results.items():
        d = r["distillation"]
        for arm in d["arms"].values():
            kept = arm["kept_fraction"]
            kept = f"{100 * kept:.0f}%" if math.isfinite(kept) else "n/a: the MoE does not beat its dense twin"
            lines.append(f"| {corpus} | {d['teacher']['final_val']:.4f} | {d['dense']['final_val']:.4f} | "
                         f"{arm['run']['final_val']:.4f} ({arm['alpha']}, {arm['temperature']}) | {kept} |")
    return lines


def compression_table(results: dict) -> list[str]:
    lines = ["| corpus | experts | method | parameters | val loss increase | after healing (vs the healed teacher) |",
             "|---|---:|---|---:|---:|---:|"]
    for corpus, r in results.items():
        c = r["compression"]
        any_arm = next(iter(c["arms"].values()))
        lines.append(f"| {corpus} | 8 | the teacher (val loss; healed) | {any_arm['params_before'] / 1e6:.2f}M | "
                     f"{c['base']:.4f} | {c['control']:.4f} |")
        for arm in c["arms"].values():
            lines.append(f"| {corpus} | {arm['experts']} | {arm['method']} | {arm['params'] / 1e6:.2f}M | "
                         f"{arm['delta']:+.4f} | {arm['healed_delta']:+.4f} |")
    return lines


def quantization_table(results: dict) -> list[str]:
    lines = ["| corpus | experts | activations | expert bytes | val loss delta | tokens/s (unquantized) |",
             "|---|---|---|---:|---:|---:|"]
    for corpus, r in results.items():
        for q in r["quantization"].values():
            group = f" (groups of {q['group_size']})" if q["group_size"] else ""
            lines.append(f"| {corpus} | {q['mode']}{group} | {q['activations']} | {q['expert_bytes'] / 2**20:.2f} MiB "
                         f"(of {q['expert_bytes_unquantized'] / 2**20:.2f}) | {q['val_loss_delta']:+.5f} | "
                         f"{q['tokens_per_s']:,.0f} ({q['tokens_per_s_unquantized']:,.0f}) |")
    return lines


def task_table(task: dict) -> list[str]:
    lines = ["| router input | domain | experts kept | parameters | full model | extracted | token-routed MoE |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for kind, r in task.items():
        for name, t in r["tasks"].items():
            size = f"{t['params'] / 1e6:.2f}M of {t['params_full'] / 1e6:.2f}M"
            lines.append(f"| {kind} | {name} | {t['experts']} | {size} | {t['full']:.4f} | {t['extracted']:.4f} | "
                         f"{t['token_routed']:.4f} |")
    return lines


def report(results: dict, command: str) -> str:
    corpora = results["corpora"]
    parts = [f"Command: `{command}`", "", "1. Distillation (validation loss, nats/byte)", "",
             *distillation_table(corpora), "", "2. Compression of the teacher (8 experts per layer)", "",
             *compression_table(corpora), "", "3. Quantized experts", "", *quantization_table(corpora)]
    if "task_routing" in results:
        parts += ["", "4. Task routing and sub-network extraction (embedded domains; loss on the domain's tokens)",
                  "", *task_table(results["task_routing"])]
    return "\n".join(parts) + "\n"


# -- driver -----------------------------------------------------------------------------------------------------------
def settings(args) -> Settings:
    if args.quick:
        return Settings(steps=20, heal=5, heal_lr=1e-3, eval_batches=4, sizes=(4,), shape=QUICK_SHAPE)
    return Settings(args.steps, args.heal, args.heal_lr, args.eval_batches, (6, 4), [])


def run_all(s: Settings, corpora: list[str], work: Path) -> dict:
    results: dict = {"settings": vars(s), "corpora": {}}
    for corpus in corpora:
        if corpus == "shakespeare" and not SHAKESPEARE.is_file():
            print(f"skipping shakespeare: {SHAKESPEARE} is absent", flush=True)
            continue
        distilled = distillation(s, corpus, work)
        results["corpora"][corpus] = {"distillation": distilled,
                                      "compression": compression(s, corpus, distilled["teacher"], work),
                                      "quantization": quantization(distilled["teacher"])}
    if "embedded" in results["corpora"]:
        results["task_routing"] = task_routing(s, results["corpora"]["embedded"]["distillation"]["teacher"], work)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="pre-training steps (make train's 300)")
    parser.add_argument("--heal", type=int, default=50, help="healing fine-tune steps")
    parser.add_argument("--heal-lr", type=float, default=1e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--corpora", default="embedded,shakespeare")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a smoke test")
    parser.add_argument("--json"), parser.add_argument("--out")
    parser.add_argument("--report", metavar="JSON", help="only rewrite the tables from a --json file of an earlier run")
    args = parser.parse_args(argv)
    command = "python bench/serve_compress.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report:
        results = json.loads(Path(args.report).read_text())
        command = results.get("command", command)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_all(settings(args), args.corpora.split(","), Path(tmp))
        results["command"] = command
    text = report(results, command)
    print(text)
    for path, content in ((args.json, json.dumps(results, indent=1)), (args.out, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    return results


if __name__ == "__main__":
    main()
