"""--lora-rank R: train low-rank adapters on the student's language model, the rest frozen (ours: a peer's
convenience, as ms-swift, TRL and verl offer; not the paper's full fine-tuning).

    student = lora.add(student, args)             # opd.load_student: adapters in place, every other weight frozen
    lora.save(student, processor, path)           # path: the merged model (eval.py loads it); path/adapter: adapters

The adapters go into the model in place (peft's inject_adapter_in_model): it stays the transformers model that
rollout.py and lib/share.py call, with the same generate and forward. The frozen weights stay in the dtype the run
computes in (bf16 with --bf16, so the 8B's weights take 2 bytes each and carry no gradient or AdamW state), the
adapters in fp32. No dropout: the model that samples must be the model that is scored (Eq. 6's pi_old).
A new adapter's B is zero, so the student starts as the full model does (tests/test_lora.py).
"""
import json
import os

from safetensors.torch import load_file, save_file

import data

# every linear layer of the language model's blocks (ms-swift's `--target_modules all-linear` on the LLM); the vision
# tower and its merger stay frozen, as the official code freezes them (freeze_vit, freeze_aligner)
TARGETS = r".*\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ADAPTER = "adapter"  # the subfolder of a checkpoint (and of final/) holding the adapters, in peft's format
PREFIX = "base_model.model."  # what PeftModel's saved adapter keys carry before the model's own names


def config(args):
    """peft's LoraConfig of the run's flags (saved beside the adapters as adapter_config.json)."""
    from peft import LoraConfig
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=TARGETS,
                      base_model_name_or_path=args.student)


def add(model, args, adapter=None):
    """Adapters of rank --lora-rank on `model`'s language model, in place; every other weight frozen -> model.
    adapter: a folder lora.save wrote (--resume), whose weights the adapters take."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    model = inject_adapter_in_model(config(args), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            param.data = param.data.float()  # fp32 adapters beside bf16 frozen weights
    if adapter:
        state = load_file(f"{adapter}/adapter_model.safetensors")
        with open(f"{adapter}/adapter_config.json") as f:
            saved = json.load(f)
        if saved["r"] != args.lora_rank:
            raise data.DataError(f"--resume: the checkpoint's adapters have rank {saved['r']}, not --lora-rank "
                                 f"{args.lora_rank}")
        # saved in PeftModel's format (save): its "base_model.model." prefix off, peft maps the rest onto the layers
        result = set_peft_model_state_dict(model, {k.removeprefix(PREFIX): v for k, v in state.items()})
        lacking = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or lacking:
            raise data.DataError(f"--resume: the adapters in {adapter} do not match this model's "
                                 f"(e.g. {(result.unexpected_keys + lacking)[:2]})")
    return model


def merged_state_dict(model):
    """The model's weights with each adapter folded in (W + scale * B @ A, in fp32, cast to W's dtype), under the
    plain model's names. The model is left as it is: merging in place and back would round the frozen weights."""
    from peft.tuners.lora import LoraLayer
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = state.pop(f"{name}.base_layer.weight")
            delta = module.get_delta_weight("default").float()
            state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
            if f"{name}.base_layer.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def save(model, processor, path):
    """The merged model (a folder plain transformers and eval.py load) in `path`, and the adapters alone in
    path/adapter (peft's format: PeftModel.from_pretrained(base, path/adapter) loads them)."""
    from peft import get_peft_model_state_dict
    model.save_pretrained(path, state_dict=merged_state_dict(model))
    processor.save_pretrained(path)
    os.makedirs(f"{path}/{ADAPTER}", exist_ok=True)
    adapters = {PREFIX + k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(adapters, f"{path}/{ADAPTER}/adapter_model.safetensors")
    model.peft_config["default"].save_pretrained(f"{path}/{ADAPTER}")
