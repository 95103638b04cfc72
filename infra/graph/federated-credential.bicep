// The app registration trusts the Function App's user-assigned managed identity (workload identity
// federation): with DATAVERSE_CREDENTIAL=federated the app gets Dataverse tokens with the identity's
// token as its client assertion, and no client secret exists anywhere.
//
// Microsoft Graph Bicep extension (types v1.0.0, Bicep 0.36.1+; alias in infra/bicepconfig.json). The
// deploying principal needs Application.ReadWrite.All (or to own the app registration). Graph's Bicep
// types address an existing application only by its uniqueName (a client-provided key), so an app
// registration made in the portal (no uniqueName) is given its federated credential with
// `az ad app federated-credential create` instead (docs/credentials.md); main.bicep deploys this
// module only when dataverseAppUniqueName is set.
//
// This file lives outside modules/ because checkov's Bicep parser (pycep 0.5) cannot read the
// `extension` keyword: the infra tests check it textually and with the newer parser instead.
extension microsoftGraphV1

@description('uniqueName of the existing app registration (DATAVERSE_CLIENT_ID\'s application).')
param appUniqueName string

@description('Principal (object) id of the Function App\'s user-assigned managed identity: the federated subject.')
param identityPrincipalId string

@description('Name of the federated credential on the app registration (unique per app).')
param credentialName string = 'function-app-identity'

resource app 'Microsoft.Graph/applications@v1.0' existing = {
  uniqueName: appUniqueName
}

resource federatedCredential 'Microsoft.Graph/applications/federatedIdentityCredentials@v1.0' = {
  name: '${app.uniqueName}/${credentialName}'
  description: 'Function App managed identity as the app registration\'s credential (no client secret)'
  issuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
  subject: identityPrincipalId
  audiences: [
    'api://AzureADTokenExchange'
  ]
}

output issuer string = federatedCredential.issuer
output subject string = federatedCredential.subject
