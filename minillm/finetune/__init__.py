"""Fine-tuning: a pre-trained model learns a labelled task (L_finetune = L_task).

Read in this order:
    config.py      FinetuneConfig: the task, the data, and which weights train (full, frozen, LoRA)
    lora.py        LoRA: low-rank adapters W + (α/r)·B·A as a module swap; merge, save the adapter alone
    qlora.py       QLoRA: the same adapters over a frozen quantized (4-bit) base; merging into a float model
    peft_format.py the adapters in PEFT's format (PeftModel loads them on the Hugging Face export), and back
    trainer.py     the loop both tasks share: choose what trains, AdamW steps, evaluate, checkpoint
    classify.py    a label per text (SST-2, any CSV/TSV/JSONL): [CLS] or last-token head, accuracy/F1
    instruct.py    instruction tuning of a causal LM: a prompt template, loss on the response only
    baseline.py    the bag-of-words classifier every fine-tuned model should beat
"""
