"""What the lessons lean on and a learner need not read first: checkpoints and run records, the runtime (device,
dtype, DDP), data sources, the CPU fast paths, GPT-2 conversion, Muon, prompt styles and chat templates (and the
chat page serve.py shows), perplexity, the command line, where a fine-tuning run starts.

The lessons at the top (config, data, model, train, generate, classify, instruct, lora, chat, serve, tour) import
from here; nothing here imports a lesson or a tool.
"""
