"""Fine-tuning with DeepSpeed ZeRO-3 on N ranks, from one machine or a Spark cluster.

Two process sides. The train step's own process (the parent) plans and launches: launch (devices,
precision, resume, the DeepSpeed launcher, and the one dispatch to a launcher), spark (the ranks
as a Spark barrier job), checkpoints (which checkpoint to resume), memory_plan (will it fit).
Each rank runs rank (the Hugging Face Trainer with ZeRO-3), trainer (its Trainer and callbacks)
and throughput; torchrun_guard runs on Spark executors. handoff is what crosses between them.

A rank starts as `python -m dolly.train.rank`, which imports this package first: like every room's
`__init__`, this one imports a module only when one of its names is first used, so a rank never
loads the launchers.
"""
import lazy_loader

# Names are imported on first use (SPEC 1 lazy loading, the lazy_loader package): importing a
# room costs nothing until one of its names is used.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["checkpoints", "handoff", "launch", "memory_plan", "rank", "spark", "throughput",
                "torchrun_guard", "trainer"],
    submod_attrs={  # module -> the public names it defines
        "handoff": ["Plan", "read_result"],
        "launch": ["exclusive", "prepare_launch", "start_ranks"],
        "memory_plan": ["plan_for", "require_fit", "visible_gpu"],
    },
)
