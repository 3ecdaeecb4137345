"""Batch scoring on Spark (the batch_score step): a table of instructions in, every row out in
order with the registered model's answer (`mlflow.pyfunc.spark_udf`) or the reason it was not
scored, as Parquet in a folder the step owns.

batch: pinning the model version, reading the input, scoring; columns: column names compared as
Spark compares them (case-insensitively by default); output: the output folder's rules (never
delete or overwrite what the step did not write). The model itself is dolly.serve: this
room runs in the Spark driver and is not shipped with the model.
"""
import lazy_loader

# Names are imported on first use (SPEC 1 lazy loading, the lazy_loader package): importing a
# room costs nothing until one of its names is used.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["batch", "columns", "output"],
    submod_attrs={  # module -> the public names it defines
        "batch": ["ResolvedModel", "check_columns", "input_column", "input_files", "read_input",
                  "logged_prompt_format", "messages_column", "resolve_model",
                  "score_to_parquet"],
        "output": ["MARKER", "MODES", "OutputFolder", "check_output", "publish", "write_sidecar"],
    },
)
