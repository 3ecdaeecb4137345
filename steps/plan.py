"""plan entry point: will this profile fit? Prints the memory plan (dolly/train/memory_plan.py).

No weights are loaded and nothing is trained; offline it reads the config.json values shipped for
a few public bases (dolly/train/known_configs/) or GPT-J 6B's shape for a Hub id of the GPT-J
family. `-P num_gpus=N -P num_nodes=M -P gpu_memory_gb=G` plan another
machine than the profile's.
"""
from __future__ import annotations

from dolly import cli, train


def main(argv: list[str]) -> None:
    cfg, _ = cli.parse(argv, {})
    plan = train.plan_for(cfg)
    print(f"plan ({cfg.profile}):", flush=True)
    for line in plan.lines():
        print(f"  {line}", flush=True)


if __name__ == "__main__":
    cli.run(main, keep_run=False)  # looking something up leaves no run
