"""The registered model at serving time: everything here ships inside the logged model (with
dolly/__init__.py, dolly/prompts.py and dolly/generation.py) and runs wherever MLflow loads it:
`mlflow models serve`, `spark_udf`, `mlflow.pyfunc.load_model`.

pyfunc: the flavor (save_model, the loader) and DollyPyfunc; contract: what a request holds and
what is refused; deadline: a request's deadline; request_batching: concurrent calls share
generations; mlflow_patches: every patch of MLflow internals.
"""
import lazy_loader

# Names are imported on first use (SPEC 1 lazy loading, the lazy_loader package): importing a
# room costs nothing until one of its names is used.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["contract", "deadline", "mlflow_patches", "pyfunc", "request_batching"],
    submod_attrs={  # module -> the public names it defines
        "contract": ["INPUT", "INPUT_ALIASES", "INSTRUCTION", "as_frame", "bad_input",
                     "check_params", "is_missing", "json_kind", "records_of", "signature"],
        "deadline": ["current_deadline", "request_deadline"],
        "mlflow_patches": ["contain_scoring_server", "install_input_checks", "parse_json_request",
                           "short_message"],
        "pyfunc": ["BATCH_WAIT_ENV", "SHIPPED_CODE", "DollyPyfunc", "batch_wait_ms", "save_model",
                   "shipped_package"],
        "request_batching": ["DeadlinePassed", "RequestBatcher"],
    },
)
