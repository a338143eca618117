"""`shitu benchmark-cpu`'s core: system facts, stage timers, the settings sweep, and what it records."""
