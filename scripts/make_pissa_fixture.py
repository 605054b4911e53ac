#!/usr/bin/env python3
"""Make tests/fixtures/peft-tiny-llama-pissa: PEFT's own PiSSA initialisation of the tiny random
Llama in tests/fixtures/peft-tiny-llama, plus float64 references for PiSSA and MiLoRA.

PEFT (`LoraConfig(init_lora_weights="pissa")`, `LoraLayer.pissa_init`) takes the SVD of every
target weight in float32, W = U S Vh, keeps the r largest components, and writes
A = diag(sqrt(S_r / s)) Vh_r, B = U_r diag(sqrt(S_r / s)) and the residual W - s B A. The
initial adapter is saved with `init_lora_weights = True`, as PEFT's PiSSA example does ("Important"):
a config saying "pissa" would make `PeftModel.from_pretrained` run the SVD again on the residual
weights; `logits.safetensors` records what that does (`reload_as_pissa_logits`).

Written (everything float32 unless noted):
  manifest.json                   settings, PEFT's own differences, versions
  pissa/corda_init/               the initial adapter as PEFT saves it (the layout corda uses)
  pissa/residual-model/           the residual model (config.json, model.safetensors)
  pissa/trained/                  the adapter after a deterministic perturbation (stands in for training)
  pissa/lora/                     PEFT's conversion of trained/ against corda_init/ (plain LoRA for base-model/)
  pissa/logits.safetensors        base_logits, init_logits (residual + corda_init), trained_logits,
                                  converted_lora_logits (base + lora/), reload_as_pissa_logits
  reference.safetensors (float64) per module M: M.S (all singular values of W, descending),
                                  M.pissa.U_r / S_r / Vh_r (r largest) and M.milora.U_r / S_r / Vh_r
                                  (r smallest), computed by torch.linalg.svd in float64

Usage: /tmp/venv-torch/bin/python scripts/make_pissa_fixture.py [OUT]
  (default OUT: tests/fixtures/peft-tiny-llama-pissa; torch 2.15, transformers 5.24, peft 0.21)
"""

import json
import os
import shutil
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASE_FIXTURE = os.path.join(ROOT, "tests/fixtures/peft-tiny-llama")
BASE = os.path.join(BASE_FIXTURE, "base-model")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 16
# Patterns exercise per-module ranks and scalings (PEFT's get_pattern_key: suffix match).
RANK_PATTERN = {"down_proj": 4}
ALPHA_PATTERN = {"down_proj": 12}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def load_base():
    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)


def config(init):
    return LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        lora_dropout=0.0,
        init_lora_weights=init,
    )


def rank_of(name):
    return next((v for k, v in RANK_PATTERN.items() if name.endswith(k)), R)


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests/fixtures/peft-tiny-llama-pissa"))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(0)
    ids = load_file(os.path.join(BASE_FIXTURE, "base_logits.safetensors"))["input_ids"].long()
    if ids.dim() == 1:
        ids = ids[None]

    base = load_base()
    base_logits = logits(base, ids)
    base_weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.split(".")[-1] in TARGETS}

    # Float64 references, independent of PEFT's float32 SVD.
    ref = {}
    for name, w in base_weights.items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = rank_of(name)
        ref[f"{name}.S"] = s.clone()
        for kind, sl in (("pissa", slice(0, r)), ("milora", slice(len(s) - r, len(s)))):
            ref[f"{name}.{kind}.U_r"] = u[:, sl].contiguous().clone()
            ref[f"{name}.{kind}.S_r"] = s[sl].contiguous().clone()
            ref[f"{name}.{kind}.Vh_r"] = vh[sl].contiguous().clone()
    save_file(ref, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})

    # PEFT's PiSSA.
    mode_dir = os.path.join(out, "pissa")
    model = get_peft_model(load_base(), config("pissa"))
    init_logits = logits(model, ids)
    model.peft_config["default"].init_lora_weights = True  # as PEFT's PiSSA example saves it
    model.peft_config["default"].base_model_name_or_path = "../../../peft-tiny-llama/base-model"
    model.save_pretrained(os.path.join(mode_dir, "corda_init"))

    # PEFT's own differences: residual + s·B·A against W, and against the float64 truth.
    peft_vs_w, peft_vs_f64 = 0.0, 0.0
    for name, w in base_weights.items():
        layer = model.get_submodule("base_model.model." + name)
        s = layer.scaling["default"]
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        sba = s * b @ a
        res = layer.base_layer.weight.double()
        exact = ref[f"{name}.pissa.U_r"] * ref[f"{name}.pissa.S_r"] @ ref[f"{name}.pissa.Vh_r"]
        wmax = w.abs().max().item()
        peft_vs_w = max(peft_vs_w, ((res + sba) - w.double()).abs().max().item() / wmax)
        peft_vs_f64 = max(peft_vs_f64, (sba - exact).abs().max().item() / wmax)

    residual = model.unload()
    residual.save_pretrained(os.path.join(mode_dir, "residual-model"), safe_serialization=True)
    for f in os.listdir(os.path.join(mode_dir, "residual-model")):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(mode_dir, "residual-model", f))

    # Reload the way users do: residual + corda_init (init_lora_weights true) == base.
    res_model = AutoModelForCausalLM.from_pretrained(os.path.join(mode_dir, "residual-model"), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(res_model, os.path.join(mode_dir, "corda_init"))
    reload_logits = logits(loaded, ids)

    # The same files with init_lora_weights "pissa": PEFT re-runs the SVD on the residual.
    tmp = os.path.join(out, "_pissa_config")
    shutil.copytree(os.path.join(mode_dir, "corda_init"), tmp)
    cfg_path = os.path.join(tmp, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["init_lora_weights"] = "pissa"
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    res_model2 = AutoModelForCausalLM.from_pretrained(os.path.join(mode_dir, "residual-model"), dtype=torch.float32)
    as_pissa_logits = logits(PeftModel.from_pretrained(res_model2, tmp), ids)
    shutil.rmtree(tmp)

    # A deterministic perturbation standing in for training, then PEFT's conversion.
    res_model3 = AutoModelForCausalLM.from_pretrained(os.path.join(mode_dir, "residual-model"), dtype=torch.float32)
    trained = PeftModel.from_pretrained(res_model3, os.path.join(mode_dir, "corda_init"), is_trainable=True)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    trained_logits = logits(trained, ids)
    trained.save_pretrained(os.path.join(mode_dir, "trained"))
    trained.save_pretrained(
        os.path.join(mode_dir, "lora"),
        path_initial_model_for_weight_conversion=os.path.join(mode_dir, "corda_init"),
    )
    # PEFT writes target_modules from a set (its order follows the hash seed): sort it, so a
    # rerun writes the same bytes.
    for d, base_path in (
        ("corda_init", "../../../peft-tiny-llama/base-model"),
        ("trained", "../residual-model"),
        ("lora", "../../../peft-tiny-llama/base-model"),
    ):
        p = os.path.join(mode_dir, d, "adapter_config.json")
        c = json.load(open(p))
        c["base_model_name_or_path"] = base_path
        if isinstance(c.get("target_modules"), list):
            c["target_modules"] = sorted(c["target_modules"])
        json.dump(c, open(p, "w"), indent=2, sort_keys=True)
    lora_model = PeftModel.from_pretrained(load_base(), os.path.join(mode_dir, "lora"))
    converted_logits = logits(lora_model, ids)

    save_file(
        {
            "input_ids": ids.contiguous(),
            "base_logits": base_logits,
            "init_logits": init_logits,
            "reload_logits": reload_logits,
            "reload_as_pissa_logits": as_pissa_logits,
            "trained_logits": trained_logits,
            "converted_lora_logits": converted_logits,
        },
        os.path.join(mode_dir, "logits.safetensors"),
        metadata={"format": "pt"},
    )

    def dmax(x, y):
        return (x - y).abs().max().item()

    manifest = {
        "made_by": "scripts/make_pissa_fixture.py",
        "versions": {"peft": peft.__version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
        "base_model": "../peft-tiny-llama/base-model",
        "init_lora_weights": "pissa",
        "rank": R,
        "lora_alpha": ALPHA,
        "rank_pattern": RANK_PATTERN,
        "alpha_pattern": ALPHA_PATTERN,
        "target_modules": TARGETS,
        "saved_init_lora_weights": True,
        "peft": {
            "max_rel_residual_plus_sBA_vs_W": peft_vs_w,
            "max_rel_sBA_vs_float64": peft_vs_f64,
            "max_abs_init_vs_base_logits": dmax(init_logits, base_logits),
            "max_abs_reload_vs_base_logits": dmax(reload_logits, base_logits),
            "max_abs_reload_as_pissa_vs_base_logits": dmax(as_pissa_logits, base_logits),
            "max_abs_converted_vs_trained_logits": dmax(converted_logits, trained_logits),
        },
    }
    # PEFT's save_pretrained writes a model card beside every adapter; it carries nothing here.
    for d in ("corda_init", "trained", "lora"):
        card = os.path.join(mode_dir, d, "README.md")
        if os.path.exists(card):
            os.remove(card)
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=2)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
