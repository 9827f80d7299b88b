"""Backdoor and stealthy-poison demo on a tiny model trained here: influence finds the poisoned examples
from a few reported ones, and unlearning removes the backdoor where retraining without them may not.

For each scenario (``backdoor``: a trigger word makes the model answer with a fixed target
text; ``stealthy``: the trigger makes it put a wrong value inside the normal answer, four
behaviours of which the reports show two) the demo generates instruction data about
fictitious entities, trains a word-level tokenizer (``tokenizers``) and a tiny
LlamaForCausalLM from scratch, then

  1. detection: scores every train example against the reported ones with several
     influence settings (on the final model, and averaged over 6 training checkpoints)
     and trivial baselines (AUROC, precision@k);
  2. unlearning from the detected forget set with GA, GradDiff, NPO, SimNPO, the RapidUn
     loss (uniform, RapidUn weights, differing tokens only), GradDiff + IMU weights and
     low-influence skipping (with a random control);
  3. retraining from scratch without the detected set;

and writes report.json, report.md and plots to --out.

    python -m fastinfluence demo            # or: make demo   (about 2-3 CPU minutes)
    python -m fastinfluence demo --quick    # smaller data, fewer epochs (CI)
"""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import summary


def _run(args) -> int:
    from ..demo import SCENARIOS, run

    if args.scenario not in (*SCENARIOS, "all"):
        raise UsageError(f"--scenario {args.scenario}: choose one of {', '.join(SCENARIOS)} or all")
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    run(args.seed, scenarios, args.quick, args.device, args.out, progress=not args.quiet)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help=summary(__doc__),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, model, projection and unlearning (default 0)")
    p.add_argument("--scenario", default="all", help="which scenario to run: backdoor, stealthy or all (default all)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (about a minute; for CI)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto: cuda when available)")
    p.add_argument(
        "--out", default="demo_out", help="directory for report.json, report.md and plots (default demo_out)"
    )
    p.set_defaults(func=_run)
