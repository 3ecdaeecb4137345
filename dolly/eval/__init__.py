"""Evaluation: a tuned model against the base it was trained from, on the held-out records.

evaluate: response-token loss and greedy generation in Dolly's format (dolly.generation, the code
the served model answers with), and the evaluate step's base-vs-tuned run; metrics: exact match,
ROUGE-L, per-family means; compare: re-scoring a registered champion on a candidate's records;
report: the side-by-side comparison the MLflow UI shows; genai: each record's base and tuned
answer with its scores as MLflow 3 GenAI evaluations (offline scorers, one trace per record).
"""
import lazy_loader

# Names are imported on first use (SPEC 1 lazy loading, the lazy_loader package): importing a
# room costs nothing until one of its names is used.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["compare", "evaluate", "genai", "metrics", "probe", "report"],
    submod_attrs={  # module -> the public names it defines
        "compare": ["evaluate_on", "evaluation_set", "rescore_champion"],
        "evaluate": ["METRICS", "EvalInputs", "Evaluation", "ModelEval", "base_vs_tuned",
                     "device", "dtype_for", "evaluate_model", "load_saved_model",
                     "resolve_inputs", "select", "train_run_params"],
        "genai": ["SCORERS", "answer_rows", "exact_match_scorer", "log_evaluations",
                  "rouge_l_scorer", "source_metadata", "stop_scorer"],
        "metrics": ["category_metrics", "exact_match", "normalise", "rouge_l"],
        "probe": ["PROBE_RECORDS", "applies", "checked_against", "probe_records", "task_words",
                  "trained_words"],
        "report": ["by_family", "family_line", "md_cell", "run_description", "what_it_shows"],
    },
)
