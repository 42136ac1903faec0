"""SplitCom: communication-efficient split federated LoRA fine-tuning of LLMs."""

__version__ = "0.1.0"
