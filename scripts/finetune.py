"""Train a tiny causal LM with transformers.Trainer: a learned optimizer vs AdamW, and plot both loss curves.

A character-level GPT-2 (built from a GPT2Config, nothing downloaded) learns public-domain text
(``lopt_hf.evaluation.lm.DEFAULT_TEXT``, or --text FILE). It is trained twice from the same initialisation:

1. with a learned optimizer — ``Trainer(..., optimizer_cls_and_kwargs=lopt_hf.trainer_optimizer(LOPT))``
   plus ``LearnedOptimizerCallback``, with the Trainer settings the README recommends for learned
   optimizers (linear LR decay, no warmup, no gradient clipping, the artifact's own lr; a rule with a
   learned schedule — Celo, Celo-Adam, VeLO — gets a constant schedule instead);
2. with AdamW — Trainer's own optimizer, with its usual recipe (linear decay, clipping at 1.0).

LOPT is ``--lopt``: a shipped name (default ``lopt-hf/celo-adam-ns``, lopt_hf's default learned
optimizer; the research baseline ``lopt-hf/small-fc-lolo`` was meta-trained on small image MLPs only and
loses to AdamW on a language model — see the model cards), a local artifact
folder or a Hub repo id; ``--lopt random`` creates a *randomly initialised* ``--rule`` artifact on the
fly. The script shows the mechanics end to end. Runs offline on CPU in under a minute with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import Trainer  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import lopt_hf  # noqa: E402
from lopt_hf import LearnedOptimizerCallback, create_artifact, load_artifact, trainer_optimizer  # noqa: E402
from lopt_hf.evaluation import smooth  # noqa: E402
from lopt_hf.evaluation.lm import (DEFAULT_TEXT, logged_losses, make_char_data, make_char_gpt2,  # noqa: E402
                                   trainer_arguments)


def make_model(vocab_size: int, block_size: int, args: argparse.Namespace) -> torch.nn.Module:
    return make_char_gpt2(vocab_size, block_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                          seed=args.seed)


def common_args(output_dir: Path, args: argparse.Namespace, **overrides):
    return trainer_arguments(output_dir, steps=args.steps, batch_size=args.batch_size, seed=args.seed, **overrides)


def run(name: str, trainer: Trainer, eval_dataset: Dataset) -> dict:
    trainer.remove_callback(PrinterCallback)  # one summary line per run instead of a dict per step
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = logged_losses(trainer)
    eval_loss = trainer.evaluate(eval_dataset)["eval_loss"]
    print(f"{name}: {len(losses)} steps in {seconds:.1f} s ({1000 * seconds / max(len(losses), 1):.0f} ms/step), "
          f"train loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of last 10), "
          f"held-out loss {eval_loss:.3f}")
    return {"losses": losses, "eval_loss": eval_loss, "seconds": seconds}


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (label, result), color in zip(curves.items(), ("tab:red", "tab:blue")):
        losses = result["losses"]
        steps = range(1, len(losses) + 1)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(losses, 10), color=color, label=f"{label} (held-out {result['eval_loss']:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/char)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lopt", default="lopt-hf/celo-adam-ns",
                        help="learned optimizer: shipped name, local folder or Hub repo id; 'random' creates a "
                             "random-init --rule artifact in --out (NOT meta-trained)")
    parser.add_argument("--rule", default="small_fc_lopt",
                        help="rule of the on-the-fly artifact with --lopt random")
    parser.add_argument("--lopt-lr", type=float, default=None,
                        help="multiplier of the learned step (default: the artifact's own lr, usually 1.0)")
    parser.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--text", type=Path, default=None, help="UTF-8 text file to train on (default: embedded "
                                                                 "public-domain text, ~4 KB)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for this tiny model; 0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("finetune_out"))
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.lopt == "random":
        artifact_dir = args.out / f"{args.rule}-random-init"
        create_artifact(args.rule, seed=args.seed,
                        provenance={"source": "scripts/finetune.py: random init, not meta-trained"}
                        ).save_pretrained(artifact_dir)
        lopt_source, meta_trained = str(artifact_dir), False
        print(f"NOTE: no --lopt given; created {artifact_dir} with RANDOMLY INITIALISED meta-parameters. It is not "
              "meta-trained, so expect it to lose to AdamW: this run shows the mechanics, not a learned optimizer's "
              "quality. Pass --lopt <name, folder or user/repo> to try a meta-trained one.")
    else:
        lopt_source, meta_trained = args.lopt, None
    artifact = load_artifact(lopt_source)  # validated now; no code from the artifact is run
    provenance = (artifact.config.provenance or {}).get("source", "unknown provenance")
    print(f"learned optimizer: rule {artifact.rule.name!r} from {lopt_source} ({provenance}); "
          f"optimizer_defaults {artifact.config.optimizer_defaults}")

    text = args.text.read_text(encoding="utf-8") if args.text else DEFAULT_TEXT
    vocab_size, train_data, eval_data = make_char_data(text, args.block_size)
    model = make_model(vocab_size, args.block_size, args)
    print(f"data: {len(text)} characters, vocabulary {vocab_size}, {len(train_data)} training blocks of "
          f"{args.block_size}; model: GPT-2 {args.n_layer} layers × {args.n_embd}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.steps} steps of batch {args.batch_size}")

    overrides = {} if args.lopt_lr is None else {"lr": args.lopt_lr}
    lopt_lr = args.lopt_lr if args.lopt_lr is not None else float(artifact.config.optimizer_defaults.get("lr", 1.0))
    # Settings recommended for learned optimizers (README, "What Trainer's settings mean"): the optimizer's own lr,
    # linear decay, no warmup, no clipping — constant for a rule that anneals its step by its learned schedule.
    lopt_settings = {"lr_scheduler_type": "constant" if artifact.rule.scheduled else "linear", "warmup_steps": 0,
                     "max_grad_norm": 0.0}
    lopt_trainer = Trainer(model=model, args=common_args(args.out / "trainer_lopt", args, learning_rate=lopt_lr,
                                                         **lopt_settings),
                           train_dataset=train_data,
                           optimizer_cls_and_kwargs=trainer_optimizer(artifact, **overrides))
    LearnedOptimizerCallback.attach(lopt_trainer)
    label = f"{artifact.rule.name}" + (" (random init)" if meta_trained is False else "")
    settings = ", ".join(f"{key}={value}" for key, value in lopt_settings.items())
    curves = {label: run(f"learned optimizer {label} ({settings})", lopt_trainer, eval_data)}

    model = make_model(vocab_size, args.block_size, args)  # same initialisation
    adamw_trainer = Trainer(model=model, args=common_args(args.out / "trainer_adamw", args,
                                                          learning_rate=args.adamw_lr),
                            train_dataset=train_data)
    curves[f"AdamW lr={args.adamw_lr:g}"] = run(f"AdamW lr={args.adamw_lr:g} (linear decay, clip 1.0)",
                                                 adamw_trainer, eval_data)

    plot_path = args.out / "loss_curves.png"
    title = (f"char-level GPT-2 ({args.n_layer}×{args.n_embd}) on {len(text)} chars, Trainer, {args.steps} steps"
             + ("\nlearned optimizer: random init (not meta-trained)" if meta_trained is False else ""))
    plot(curves, plot_path, title)
    summary = {"lopt": lopt_source, "rule": artifact.rule.name, "meta_trained": meta_trained,
               "lopt_version": lopt_hf.__version__, "steps": args.steps, "lopt_trainer_settings": lopt_settings,
               **{name: {"final_train_loss_mean10": sum(r["losses"][-10:]) / len(r["losses"][-10:]),
                         "eval_loss": r["eval_loss"], "seconds": r["seconds"]} for name, r in curves.items()}}
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    assert all(math.isfinite(loss) for result in curves.values() for loss in result["losses"])
    print(f"plot: {plot_path.resolve()}\nmetrics: {(args.out / 'metrics.json').resolve()}")


if __name__ == "__main__":
    main()
