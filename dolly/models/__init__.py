"""Base models: the tiny GPT-J of the offline default (tiny), pretrained once per configuration
on the built-in corpus and cached (pretrain), or any model `from_pretrained` loads from the Hub or
a folder (base); LoRA / QLoRA adapters on a base, through peft (lora); the training forward
that computes logits only where the loss counts (labelled_loss).
"""
import lazy_loader

# Names are imported on first use (SPEC 1 lazy loading, the lazy_loader package): importing a
# room costs nothing until one of its names is used.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["base", "labelled_loss", "lora", "pretrain", "tiny", "varlen"],
    submod_attrs={  # module -> the public names it defines
        "base": ["base_location", "load_base_model"],
        "labelled_loss": ["PLAIN_HEAD_TYPES", "install", "uninstall"],
        "lora": ["add_adapters", "base_reference", "is_adapter", "load_with_adapter",
                 "merge_into_base", "require_qlora_device", "resolve_base_path"],
        "pretrain": ["CACHE_ENV", "base_info", "base_key", "cache_root", "cached_base",
                     "copy_accuracy", "ensure_base", "is_pretrained_tiny", "log_base",
                     "pretraining_texts", "unseen_copy_lines"],
        "tiny": ["build_tiny", "tiny_config"],
        "varlen": ["Kernel", "VarlenGPTJAttention", "calls", "disable", "enable", "enabled",
                   "find_kernel", "segments"],
    },
)
