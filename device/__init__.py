"""The device side: runtimes, the prototype learner and prediction. Never imports torch."""
