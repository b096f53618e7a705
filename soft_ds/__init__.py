"""soft-ds: Sorted Fine-Tuning (SoFT) of LLaMA models on DeepSpeed pipelines."""
