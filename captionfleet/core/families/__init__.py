"""Serving every family but ViT-GPT2: any checkpoint transformers maps to ``AutoModelForImageTextToText``.

- ``prompts.py``: one image and its prompt -> the model's inputs for that image (the decode threads);
- ``collate.py``: many images' inputs -> one batch (left or right padding, images of different sizes);
- ``captioner.py``: ``FamilyCaptioner``, the ``CaptionModel`` of these families.

The families' differences (default prompt, prompt style, padding side) are written in core/family.py;
their processors are assembled, without torchvision, by core/processors.py.
"""
