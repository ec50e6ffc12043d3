"""Backends: thin adapters that drive the shared sequence machinery (sequence.py) and the batched monitor
over an engine: Hugging Face transformers (hf.py) and vLLM (vllm.py, the drivers; vllm_engine.py, the engine
built for them; vllm_worker.py, loaded by name inside vLLM's worker process). detokenize.py turns token ids
into text incrementally for both."""
