"""Model compression: INT8 (Paddle PTQ, QAT, ONNX Runtime), filter pruning with distillation, and the
before/after measurements that decide whether a compressed model is good enough to write.
"""
