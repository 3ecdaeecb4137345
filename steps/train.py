"""train entry point: prepared/ -> DeepSpeed ZeRO-3 ranks (or data-parallel LoRA ranks) ->
<output_dir>/final (full weights, or a LoRA adapter; merged into its base with merge=true) ->
logged model.

This process owns the MLflow run: it logs the resolved config, launches the ranks (rank 0 logs
params, the per-step curves and the end-of-training tags into this run: dolly.train.trainer), and
logs the final model once, named after its base (`dolly-<base model>`, dolly.registry).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import mlflow

from dolly import cli, data, models, pipeline, registry, tracking, train
from dolly.errors import DollyError
from dolly.tokenizer import load_tokenizer


def main(argv: list[str]) -> None:
    cfg, inputs = cli.parse(argv, {"prepared": None})
    gpus = train.visible_gpu()[0] if cfg.num_gpus != 0 else 0
    # qlora's 4-bit base needs CUDA: refused before anything is read, loaded or written (Spark
    # GPU executors count when num_gpus is set)
    models.require_qlora_device(cfg, bool(gpus) or (cfg.launcher == "spark" and cfg.num_gpus > 0))
    if models.is_adapter(cfg.base_model):
        raise DollyError(f"config key 'base_model': {cfg.base_model} is a LoRA adapter, not a "
                         f"base model: train on its base ({models.base_reference(cfg.base_model)['name']}) "
                         "or log the adapter merged (merge=true)")
    # system metrics (CPU, memory, GPU) of this process's machine, sampled by MLflow
    with (pipeline.step_run(cfg, "train", log_system_metrics=True) as run,
          train.exclusive(cfg)):
        prepared = tracking.local_path(inputs["prepared"], "prepared data")
        train_df, _, summary = data.load_prepared(prepared)
        if gpus:  # before anything is loaded or changed on disk: will this profile fit?
            train.require_fit(cfg, gpus_per_node=cfg.num_gpus if cfg.num_gpus > 0 else gpus,
                              seq_len=int(summary["token_lengths"]["max"]))
        plan = train.prepare_launch(cfg, prepared)
        if cfg.adapters and cfg.lora_learning_rate:
            plan.notes.append(f"{cfg.finetune} trains at lora_learning_rate "
                              f"{cfg.lora_learning_rate:g} (learning_rate {cfg.learning_rate:g} "
                              "is full fine-tuning's)")
        for note in plan.notes:
            print(f"train: {note}", flush=True)
        tracking.log_config(plan.cfg, "train")
        base = models.ensure_base(plan.cfg, load_tokenizer(str(prepared / "tokenizer")),
                                  log=lambda line: print(f"train: {line}", flush=True))
        if base is not None:  # the ranks load it from the cache; this run says which one
            models.log_base(base)
        if plan.cfg.adapters:  # the base the adapter will refer to: found before training
            path, name, revision = models.base_location(plan.cfg, load_tokenizer(
                str(prepared / "tokenizer")))
            mlflow.set_tags({"adapter_base": path, **({"adapter_base_revision": revision}
                                                       if revision else {})})
        mlflow.log_param("prepared", inputs["prepared"][:500])
        data.log_split(plan.cfg, train_df, "train", summary.get("data_hash", ""))
        how = ("ZeRO-3" if not plan.cfg.adapters else
               f"{plan.cfg.finetune} adapters (r={plan.cfg.lora_r}), data parallel")
        print(f"train: {plan.world_size} rank(s) ({'GPU' if plan.gpu else 'CPU, gloo'}), "
              f"{plan.cfg.precision}, {how}, {plan.cfg.launcher} launcher; output in "
              f"{plan.cfg.output_dir}", flush=True)
        code = train.start_ranks(plan, prepared, inputs["prepared"], run.info.run_id,
                                 mlflow.get_tracking_uri())
        if code != 0:
            raise DollyError(f"training failed: the launcher exited with code {code} "
                             "(the failing rank's error is above)")
        if plan.cfg.node_rank != 0:
            print("train: this node's ranks finished; node 0 logs the model", flush=True)
            return
        result = train.read_result(plan.cfg)  # rank 0 logged resumed_from_step as a param
        final = Path(result["final_dir"])
        if plan.cfg.merge:  # log the merged full model instead of the adapter
            merged = final.with_name(final.name + "-merged")
            if merged.exists():
                shutil.rmtree(merged)
            models.merge_into_base(final, merged)
            print(f"train: merged the adapter into its base: {merged}", flush=True)
            final = merged
        model_uri = registry.log_model(final, plan.cfg)
        mlflow.set_tag("model_uri", model_uri)
        print(f"train: {result['global_step']} steps (resumed from step "
              f"{result['resumed_from_step']}), final loss {result['final_loss']:.4f}, "
              f"{result['seconds']:.0f} s; model_uri = {model_uri}", flush=True)


if __name__ == "__main__":
    cli.run(main)
