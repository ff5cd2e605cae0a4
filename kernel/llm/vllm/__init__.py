"""Models of kind "vllm": served by vLLM's in-process engine behind Kernos's Engine interface (engine.py), from
engine arguments checked before vLLM starts (setup.py)."""
