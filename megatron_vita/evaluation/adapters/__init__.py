"""Long-VITA as a model of the outside evaluation harnesses, driving this package's Generators.

lmms-eval (EvolvingLMMs-Lab/lmms-eval) loads plugin packages named in `LMMS_EVAL_PLUGINS`: it
imports `<plugin>.models`, reads its AVAILABLE_MODELS {name: class} and imports the class from
`<plugin>.models.<name>`. So, with lmms-eval installed:

    LMMS_EVAL_PLUGINS=megatron_vita.evaluation.adapters python -m lmms_eval --model long_vita \\
        --model_args pretrained=/models/Long-VITA-128K_HF,max_num_frame=256 --tasks videomme

(`pretrained` may also be a Megatron checkpoint, with tp=,pp=,cp=). The class also registers
itself with lmms-eval's `register_model("long_vita")` for the Python API.

VLMEvalKit (open-compass/VLMEvalKit) takes models from `vlmeval.config.supported_VLM`:

    from megatron_vita.evaluation.adapters.vlmevalkit import register
    register("LongVITA_mv", model_path="/models/Long-VITA-128K_HF", max_num_frame=256)

Neither harness is a dependency: the adapter classes are built on first access (their base
classes live in the harness), and everything they do besides subclassing is in
`messages.py` (the conversion of each harness's input into a GenerationRequest, and
`HarnessModel`), which is tested without them.
"""
