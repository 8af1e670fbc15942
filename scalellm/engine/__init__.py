"""The engine: block manager, scheduler, model runner, sampler."""
