"""tsdk_monai.losses"""
