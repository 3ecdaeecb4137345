"""Instruction data, from any source to what training reads.

data_prep (`prepare`): read a dataset exactly (readers: files, encodings, layouts), validate each
record (validation: every rejection counted and listed), format it in Dolly's training text,
tokenize, apply the length policy and split into `prepared/`; `load_prepared` reads it back.
Training reads batches through the label-masking collator, packed into rows (packing) or as
padded rows (the length-grouped sampler or random order). The
offline default's records (builtin_tasks) and the pretraining corpus (corpus) are generated here.
"""
import lazy_loader

# Names are imported on first use (SPEC 1 lazy loading, the lazy_loader package): importing a
# room costs nothing until one of its names is used.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["batching", "builtin_tasks", "collator", "corpus", "lineage", "packing",
                "prepared", "readers", "validation"],
    submod_attrs={  # module -> the public names it defines
        "batching": ["LengthGroupedSampler", "padding_efficiency"],
        "collator": ["IGNORE_INDEX", "CompletionCollator", "collator_for"],
        "lineage": ["dataset_source", "log_split"],
        "packing": ["PackingCollator", "pack_rows", "packed_efficiency", "take_counts",
                    "train_collator_for"],
        "prepared": ["PrepareFailed", "Prepared", "load_prepared", "prepare", "split_indices"],
        "readers": ["SUFFIXES", "DataSource", "list_files", "read_file", "resolve_source"],
    },
)
