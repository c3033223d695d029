"""Damage prediction: each elementwise edit's ΔNLL from one gradient pass (:mod:`esa.predict.taylor`), the
whole-model bit-vulnerability map (:mod:`esa.predict.vmap`), and its verification against measured trials
(:mod:`esa.predict.verify`)."""
