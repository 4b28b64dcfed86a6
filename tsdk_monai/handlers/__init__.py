"""tsdk_monai.handlers"""
