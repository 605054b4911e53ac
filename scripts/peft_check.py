#!/usr/bin/env python3
"""Check corda's outputs with the reference implementation: Hugging Face PEFT + transformers.

Runs PEFT's own CorDA (`preprocess_corda` + `get_peft_model`) on the same base model and the same
calibration rows as a `corda-preprocess` run, compares the two, and loads every corda output
with PEFT the way users do:

  1. covariances (our --covariance_file vs PEFT's), residual weights and s*B*A per module;
  2. PeftModel.from_pretrained(residual, OUT, subfolder="corda_init") == the base model;
  3. residual + fine-tuned adapter (FT/ft) == base + converted LoRA (corda-convert output);
  4. a merged model (corda-convert --merge) == residual + fine-tuned adapter.

Needs torch, transformers and peft (e.g. scripts/bench/setup_reference.sh). Not part of CI:
CI checks the same numbers against fixtures PEFT produced (../shared/fixtures).

Example (after scripts/quickstart.sh, whose preprocess used --covariance_file):
  python scripts/peft_check.py --base demo/model --residual demo/corda --calib demo/data/qa.jsonl \
      --template '{question}' --n 64 --max_length 64 --r 8 --covariance demo/corda-cov.safetensors \
      --ft demo/ft/ft --lora demo/lora
"""

import argparse
import copy
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBE = "what is the capital of the country with the longest river"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def peft_damp(c):
    """PEFT's δ: its float32 loop (torch.linalg.inv, ‖Cf·Cf⁻¹ − I‖_F < 0.05)."""
    damp, eye = 0.01, torch.eye(c.shape[0])
    while True:
        cf = c + torch.diag(torch.ones(c.shape[0]) * torch.mean(torch.diag(c)) * damp)
        if torch.dist(cf @ torch.linalg.inv(cf), eye).item() < 0.05:
            return damp
        damp *= 2


def exactness(a, alpha, base_w, peft_cov, peft_state, ours_ad):
    """Both sides against PEFT's algorithm in float64 on PEFT's covariance and δ: per projection,
    the worst ‖s·B·A − exact‖_F / ‖exact‖_F, and whether our δ (corda_report.json) is PEFT's."""
    ours_damp = {m["name"]: m["damp"] for m in json.load(open(f"{a.residual}/corda_init/corda_report.json"))["modules"]}
    scaling = alpha / a.r
    worst, same_damp = {}, 0
    for name in sorted(peft_cov):
        c = peft_cov[name].float()
        damp = peft_damp(c)
        same_damp += damp == ours_damp.get(name)
        if damp != ours_damp.get(name):
            print(f"δ differs: {name}: PEFT {damp}, ours {ours_damp.get(name)}", file=sys.stderr)
        c64 = c.double()
        cf = c64 + torch.eye(c.shape[0], dtype=torch.float64) * torch.mean(torch.diag(c64)) * damp
        U, S, Vh = torch.linalg.svd(base_w[f"{name}.weight"].double() @ cf, full_matrices=False)
        sl = slice(0, a.r) if a.ipm else slice(S.shape[0] - a.r, S.shape[0])
        exact = (U[:, sl] * S[sl]) @ torch.linalg.solve(cf, Vh[sl].T).T
        A = peft_state[f"base_model.model.{name}.lora_A.default.weight"].double()
        B = peft_state[f"base_model.model.{name}.lora_B.default.weight"].double()
        oA = ours_ad[f"base_model.model.{name}.lora_A.weight"].double()
        oB = ours_ad[f"base_model.model.{name}.lora_B.weight"].double()
        proj = name.rsplit(".", 1)[-1]
        for side, (bb, aa) in (("peft", (B, A)), ("ours", (oB, oA))):
            err = (torch.linalg.norm(scaling * bb @ aa - exact) / torch.linalg.norm(exact)).item()
            key = f"{side}_vs_float64_worst_{proj}"
            worst[key] = max(worst.get(key, 0.0), err)
    worst["same_damp_as_peft"] = f"{same_damp} of {len(peft_cov)}"
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--residual", required=True, help="corda-preprocess --save_path")
    p.add_argument("--calib", required=True, help="the .jsonl given to corda-preprocess")
    p.add_argument("--template", required=True)
    p.add_argument("--n", type=int, required=True, help="--calib_loader_size")
    p.add_argument("--max_length", type=int, required=True, help="--calib_max_length")
    p.add_argument("--r", type=int, required=True)
    p.add_argument("--lora_alpha", type=float)
    p.add_argument("--ipm", action="store_true", help="the run used --first_eigen")
    p.add_argument("--covariance", help="our --covariance_file")
    p.add_argument("--ft", help="corda-finetune output adapter (FT/ft)")
    p.add_argument("--lora", help="corda-convert output")
    p.add_argument("--merged", help="corda-convert --merged_path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact", action="store_true",
                   help="also compare both sides with PEFT's algorithm in float64 (real weights)")
    p.add_argument("--save_peft_covariance", help="write PEFT's covariances here (safetensors)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    alpha = a.lora_alpha or a.r
    report = {}

    tok = AutoTokenizer.from_pretrained(a.base)
    rows = [json.loads(line) for line in open(a.calib) if line.strip()][: a.n]
    texts = [a.template.format(**row) for row in rows]
    samples = [torch.tensor([tok(t)["input_ids"][: a.max_length]]) for t in texts]
    probe = torch.tensor([tok(PROBE)["input_ids"]])

    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval()
    base_logits = logits(base, probe)
    base_w = {k: v.clone() for k, v in base.state_dict().items()}

    # PEFT's own CorDA on the same rows, one sample per forward (as PEFT requires).
    model = copy.deepcopy(base)

    def run_model():
        for s in samples:
            model(input_ids=s, attention_mask=torch.ones_like(s))

    cfg = LoraConfig(
        init_lora_weights="corda",
        target_modules=TARGETS,
        r=a.r,
        lora_alpha=alpha,
        corda_config=CordaConfig(corda_method="ipm" if a.ipm else "kpm", prune_temporary_fields=False),
    )
    preprocess_corda(model, cfg, run_model=run_model)
    peft_cov = {n: m.covariance_matrix.clone() for n, m in model.named_modules() if hasattr(m, "covariance_matrix")}
    if a.save_peft_covariance:
        # corda-preprocess --covariance_file --allow_unchecked_files takes it (it has no corda
        # provenance): our decomposition on PEFT's covariances.
        from safetensors.torch import save_file
        save_file({n: c.float().contiguous() for n, c in peft_cov.items()}, a.save_peft_covariance)
    peft_model = get_peft_model(model, cfg)
    peft_state = {k: v for k, v in peft_model.state_dict().items()}

    ours = AutoModelForCausalLM.from_pretrained(a.residual, dtype=torch.float32).eval()
    ours_w = ours.state_dict()
    ours_ad = load_file(f"{a.residual}/corda_init/adapter_model.safetensors")
    worst_res, worst_ba, worst_cov = 0.0, 0.0, 0.0
    scaling = alpha / a.r
    for name in sorted(peft_cov):
        w = base_w[f"{name}.weight"]
        tol_scale = w.abs().max().item()
        theirs_res = peft_state[f"base_model.model.{name}.base_layer.weight"]
        worst_res = max(worst_res, ((ours_w[f"{name}.weight"] - theirs_res).abs().max() / tol_scale).item())
        A = peft_state[f"base_model.model.{name}.lora_A.default.weight"]
        B = peft_state[f"base_model.model.{name}.lora_B.default.weight"]
        oA = ours_ad[f"base_model.model.{name}.lora_A.weight"]
        oB = ours_ad[f"base_model.model.{name}.lora_B.weight"]
        worst_ba = max(worst_ba, ((scaling * (oB @ oA - B @ A)).abs().max() / tol_scale).item())
        if a.covariance:
            oc = load_file(a.covariance)[name]
            c = peft_cov[name]
            worst_cov = max(worst_cov, (torch.linalg.norm(oc - c) / torch.linalg.norm(c)).item())
    report["residual_max_diff_over_max_w"] = worst_res
    report["sBA_max_diff_over_max_w"] = worst_ba
    if a.exact:
        report.update(exactness(a, alpha, base_w, peft_cov, peft_state, ours_ad))
    if a.covariance:
        report["covariance_rel_fro"] = worst_cov

    # Our outputs, loaded with PEFT the way users load them.
    init = PeftModel.from_pretrained(copy.deepcopy(ours), a.residual, subfolder="corda_init").eval()
    report["corda_init_vs_base_max_abs_logit"] = (logits(init, probe) - base_logits).abs().max().item()
    if a.ft:
        ft = PeftModel.from_pretrained(copy.deepcopy(ours), a.ft).eval()
        ft_logits = logits(ft, probe)
        report["ft_vs_base_max_abs_logit"] = (ft_logits - base_logits).abs().max().item()
        if a.lora:
            lora = PeftModel.from_pretrained(copy.deepcopy(base), a.lora).eval()
            report["converted_lora_vs_ft_max_abs_logit"] = (logits(lora, probe) - ft_logits).abs().max().item()
        if a.merged:
            merged = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32).eval()
            report["merged_vs_ft_max_abs_logit"] = (logits(merged, probe) - ft_logits).abs().max().item()
    print(json.dumps(report, indent=2))
    # With --exact (real weights) PEFT's own float32 result is not the reference: our factors are
    # held to the float64 one instead, and PEFT's distance from it is information.
    skip = {"ft_vs_base_max_abs_logit"}
    if a.exact:
        skip |= {"residual_max_diff_over_max_w", "sBA_max_diff_over_max_w"}
    bad = [k for k, v in report.items()
           if k not in skip and not k.startswith("peft_vs") and isinstance(v, float) and not v < 1e-3]
    if bad:
        print(f"FAILED: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
