"""Joint architecture + schedule search: the MCUNetV2 space, the weight-sharing supernet and
its training, the accuracy predictor, the evolutionary search and the model family format.
"""
