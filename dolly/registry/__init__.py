"""The MLflow Model Registry side: package the tuned model (package: transformers flavor with
dolly.serve as its pyfunc), describe it (card: licence, model card), register it and move the
champion alias only through the promotion gate (gate).
"""
import lazy_loader

# Names are imported on first use (SPEC 1 lazy loading, the lazy_loader package): importing a
# room costs nothing until one of its names is used.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["card", "gate", "package"],
    submod_attrs={  # module -> the public names it defines
        "card": ["base_licence", "data_licence", "license_note", "merge_licences", "model_card",
                 "registered_model_description"],
        "gate": ["GateResult", "champion", "gate_decision", "promote", "register"],
        "package": ["log_model", "logged_model_name", "pip_requirements"],
    },
)
