"""The model side: one model, loaded and run (no nudging in here).

config.py (config.json / GGUF metadata -> ModelConfig), loader.py (safetensors and GGUF weights,
family registry), families/ (Llama/Llama-3, Qwen2, Gemma-2, OLMo, OLMo-2 on one decoder),
model_runner.py (paged-KV forward of a batch), graph_runner.py (decode-shaped passes from captured CUDA graphs,
or their CPU replay emulation), byte_alphabet.py, sizing.py (KV pool sizes), model_pair.py (the loaded
models with their pools), scoring.py (load_model: log-likelihood scoring), tokenizer.py and
gguf_*.py, chat_sandbox.py (chat templates rendered in a renderer process on a budget), limits.py (bounds
on a model file's sizes and memory), real_model.py (the real test model's fetcher), errors.py.

May import: nudge_engine._core, nudge_engine.layers, nudge_engine.kernels. Never engine/, pairing/, distributed/,
server/.
"""
