"""zinit inside the tools people already use: Hugging Face ``Trainer`` (:mod:`zinit.integrations.trainer`) and peft
(:mod:`zinit.integrations.peft`). Each module imports its library only when it is imported itself."""
