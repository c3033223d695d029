"""Scaling studies: the protocol measured along a model-size ladder (:mod:`.fits`) and the ``esa scaling``
ladder run as a study (:mod:`.ladder`)."""
