"""patchlab: did fine-tuning really erase the knowledge, or only hide it?"""
