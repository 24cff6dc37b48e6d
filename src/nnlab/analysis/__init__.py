"""The analysis verbs: each reads a run folder and writes its results into it (nnlab.runfolder names the files)."""
