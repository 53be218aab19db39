"""Analyses of weights and behaviour: parameter diffs, behavioural tests and the method comparison."""
