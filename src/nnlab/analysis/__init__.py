"""The analysis verbs: each module reads a run folder (or a data set, through the same config and
task a run uses) and writes its results into a folder, under the names nnlab.runfolder gives them.

    baselines.py        `nnlab baselines`: scikit-learn's traditional models on the deep model's split
    learning_curve.py   `nnlab learning-curve`: accuracy against training-set size, deep model vs baselines
    explain.py          `nnlab explain`: attributions (Captum) and attention maps; figures in explain_figures.py
"""
