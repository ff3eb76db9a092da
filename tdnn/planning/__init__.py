"""Level 3: deciding before decomposing — the plan record of each layer, rank specifications and
rules, and what a layer costs (parameters, FLOPs, latency) at any rank."""
