"""Every `tdg` stage command: its one-line summary, its module and its config class.

Its own module (data only, no imports) so that the CLI, the pipeline and the plan can all read it without
importing one another.
"""

from __future__ import annotations

STAGES = {
    "sft": ("fine-tune on chosen rationales (LoRA or full): the usual distillation baseline, or pre-training",
            "train.stages.sft", "SftConfig"),
    "neg": ("train the negative teacher: a LoRA adapter on the NEGATIVE rationales",
            "train.stages.neg", "NegConfig"),
    "nat": ("train NAT: a positive LoRA + attention gate over the frozen neg adapter, on POSITIVE rationales",
            "train.stages.nat", "NatConfig"),
    "score": ("score every positive sample with the NAT teacher once: NCE weights (beta) and top-k log-probs",
              "train.stages.score", "ScoreConfig"),
    "distill": ("NCE distillation: a student trained with CE + beta-weighted KD from the NAT teacher",
                "train.stages.distill", "DistillConfig"),
    "dpo": ("DPO baseline: a LoRA on a merged SFT model, trained on (pos, neg) pairs against the SFT model",
            "train.stages.dpo", "DpoConfig"),
    "redi": ("REDI baseline: a LoRA on a merged SFT model, trained with the reference-free REDI objective",
             "train.stages.redi", "RediConfig"),
    "ranker": ("train the ASC ranker: a scalar head (LoRA body) scoring positive above negative rationales",
               "train.stages.ranker", "RankerConfig"),
    "eval": ("evaluate a model: greedy, self-consistency and ranker-weighted (ASC) accuracy on test questions",
             "train.stages.evaluate", "EvalConfig"),
}

STAGES["sample"] = ("sample n rationales per question from a teacher (in-process or an OpenAI-compatible server), "
                    "written in the flat layout tdg prepare grades", "train.stages.sample", "SampleConfig")
STAGES["ablation"] = ("does negative data help? train and evaluate every baseline and variant over seeds "
                      "(base, sft-pos, sft-mix, neg-then-pos, ul, dpo, redi, nat, kd, nat+nce)",
                      "train.ablation", "AblationConfig")
