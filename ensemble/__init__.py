"""The last stages: TenCrop probabilities per model, the ensemble, the submission and its score.

`ensemble.logits` (`make logits`), `ensemble.blend`
(`make ensemble`), `ensemble.submission` (the CSV the challenge server reads, and its validator),
`ensemble.evaluate` (`make evaluate`). docs/recipe.md section 5 fixes the defaults.
"""
