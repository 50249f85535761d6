import click

@click.group()
def avprep():
    pass

@click.group()
def avtrain():
    pass
