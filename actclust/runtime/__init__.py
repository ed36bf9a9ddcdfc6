"""Ray runtime under every stage: starting or joining Ray, actor resources and threads,
actor groups that survive a lost worker, and the fault-injection hooks."""
