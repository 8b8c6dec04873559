"""zinit inside the tools people already use: Hugging Face ``Trainer`` (:mod:`zinit.integrations.trainer`) and peft
(:mod:`zinit.integrations.peft`: peft's ``get_peft_model`` / ``PeftModel`` and transformers' own adapter methods,
``model.load_adapter`` and the rest). Each module imports its library only when it is imported itself."""
